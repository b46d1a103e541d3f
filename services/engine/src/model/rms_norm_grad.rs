//! RMSNorm as one differentiable op on the CPU, for training: `y = x · w / sqrt(mean(x²) + ε)`
//! per row, forward in one pass and backward in one pass per row (with the weight's gradient
//! summed per task, then over the tasks in order).
//!
//! Why: candle's differentiable RMSNorm is composed of seven element-wise and reduction ops
//! forward and about twice as many backward, and a training step of the shipped model's preset
//! runs 17 norms over 4,096 positions per micro-batch (two per layer, the per-head q/k norms, the
//! final one). Decoding takes `rms_norm_rows` (no gradient).
//!
//! Backward, for one row with r = 1/sqrt(mean(x²) + ε) and g = dy · w:
//! dx = r · (g − x · r² · mean(g · x)), dw = Σ over rows of dy · x · r.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::op_inputs::{host_values, norm_inputs, norm_op};
use super::row_tasks::VALUES_PER_TASK;

/// The norm of `x [..., n]` with weight `w [n]`: this op for f32 on the CPU, else candle's
/// composed form (`fallback`).
pub(crate) fn rms_norm_differentiable(
    x: &Tensor,
    w: &Tensor,
    eps: f64,
    fallback: impl FnOnce() -> Result<Tensor>,
) -> Result<Tensor> {
    norm_op(x, w, fallback, |x, w| {
        x.apply_op2(w, RmsNormGrad { eps: eps as f32 })
    })
}

struct RmsNormGrad {
    eps: f32,
}

impl RmsNormGrad {
    /// 1 / sqrt(mean(x²) + ε), the square sum in f64.
    fn inverse_rms(&self, row: &[f32]) -> f32 {
        let squares: f64 = row.iter().map(|&v| (v as f64) * (v as f64)).sum();
        (1.0 / (squares / row.len() as f64 + self.eps as f64).sqrt()) as f32
    }

    fn rows_per_task(n: usize) -> usize {
        (VALUES_PER_TASK / n.max(1)).max(1)
    }
}

impl CustomOp2 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms-norm-differentiable"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = norm_inputs("rms norm", (xs, xl), (ws, wl))?;
        let n = w.len();
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(n * Self::rows_per_task(n))
            .zip(x.par_chunks(n * Self::rows_per_task(n)))
            .for_each(|(out, x)| {
                for (o, x) in out.chunks_exact_mut(n).zip(x.chunks_exact(n)) {
                    let r = self.inverse_rms(x);
                    for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
                        *o = x * r * w;
                    }
                }
            });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (xv, wv, dy) = (host_values(x)?, host_values(w)?, host_values(grad)?);
        let n = wv.len();
        if dy.len() != xv.len() || n == 0 || xv.len() % n != 0 {
            candle_core::bail!(
                "rms norm: gradient of {} values for x of {} and w of {n}",
                dy.len(),
                xv.len()
            );
        }
        let chunk = n * Self::rows_per_task(n);
        let mut dx = vec![0f32; xv.len()];
        // Each task's share of dw, added up in task order below (the same sum on every run).
        let dw_parts: Vec<Vec<f64>> = dx
            .par_chunks_mut(chunk)
            .zip(xv.par_chunks(chunk).zip(dy.par_chunks(chunk)))
            .map(|(dx, (x, dy))| {
                let mut dw = vec![0f64; n];
                for ((dx, x), dy) in dx
                    .chunks_exact_mut(n)
                    .zip(x.chunks_exact(n))
                    .zip(dy.chunks_exact(n))
                {
                    let r = self.inverse_rms(x);
                    let gx: f64 = dy
                        .iter()
                        .zip(&wv)
                        .zip(x)
                        .map(|((&dy, &w), &x)| (dy * w) as f64 * x as f64)
                        .sum();
                    let k = r * r * (gx / n as f64) as f32;
                    for i in 0..n {
                        dx[i] = r * (dy[i] * wv[i] - x[i] * k);
                        dw[i] += (dy[i] * x[i] * r) as f64;
                    }
                }
                dw
            })
            .collect();
        let mut dw = vec![0f64; n];
        for part in &dw_parts {
            for (a, b) in dw.iter_mut().zip(part) {
                *a += b;
            }
        }
        let dw: Vec<f32> = dw.into_iter().map(|v| v as f32).collect();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, w.shape(), w.device())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support::values;
    use candle_core::{Device, Var};

    /// candle's composed RMSNorm, the reference (candle_nn's `forward_diff`).
    fn composed(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
        let n = x.dim(candle_core::D::Minus1).unwrap() as f64;
        let ms = (x
            .sqr()
            .unwrap()
            .sum_keepdim(candle_core::D::Minus1)
            .unwrap()
            / n)
            .unwrap();
        let normed = x
            .broadcast_div(&(ms + eps).unwrap().sqrt().unwrap())
            .unwrap();
        normed.broadcast_mul(w).unwrap()
    }

    #[test]
    fn output_and_gradients_equal_candles_composed_norm() {
        let dev = Device::Cpu;
        // Rows past one task (threads, and dw summed over several tasks); widths of the shipped
        // model's hidden state and its heads.
        for (rows, n) in [(3usize, 8usize), (200, 256), (600, 64)] {
            let x = Var::from_vec(values(rows * n, 1), (rows, n), &dev).unwrap();
            let w = Var::from_vec(values(n, 2), n, &dev).unwrap();
            let weight = Tensor::from_vec(values(rows * n, 3), (rows, n), &dev).unwrap();
            let eps = 1e-6;
            let refused = || {
                Err(candle_core::Error::Msg(
                    "f32 on the CPU takes the op".into(),
                ))
            };
            let fused =
                rms_norm_differentiable(x.as_tensor(), w.as_tensor(), eps, refused).unwrap();
            let reference = composed(x.as_tensor(), w.as_tensor(), eps);
            let diff = (&fused - &reference)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert!(
                diff.to_scalar::<f32>().unwrap() <= 1e-5,
                "rows {rows}, n {n}: {diff}"
            );
            let grads = |y: &Tensor| {
                (y * &weight)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap()
            };
            let (a, b) = (grads(&fused), grads(&reference));
            for (name, var) in [("x", &x), ("w", &w)] {
                let (g, r) = (a.get(var).unwrap(), b.get(var).unwrap());
                let scale = r
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let diff = (g - r).unwrap().abs().unwrap().max_all().unwrap();
                let diff = diff.to_scalar::<f32>().unwrap();
                assert!(
                    diff <= 1e-5 * scale.max(1.0),
                    "d{name}, rows {rows}, n {n}: {diff}"
                );
            }
        }
    }
}
