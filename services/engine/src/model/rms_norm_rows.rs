//! RMSNorm at inference on the CPU, `y = x / sqrt(mean(x²) + ε) · w` per row: a row's sum of
//! squares in sixteen lanes ([`crate::simd::dot`]), in the row-loop builds of `simd`.
//!
//! Why: candle's fused CPU norm adds a row's squares one after another, for the shipped model's
//! 256 values a chain of 256 dependent adds, and hands its rows to rayon whatever their count.
//! A step batcher's part of 8 sequences norms about 47 rows four times a layer (the input and
//! post-attention norms, the per-head q and k norms), about 9 µs each that way, some 7% of a
//! 16-sequence round on the 2-core Xeon (docs/benchmarks.md, issue 6). Each value is
//! multiplied by 1/m, where candle divides it by m (a division per value, 16 lanes every 10
//! cycles or so): the two differ by the order of a row's sum and a rounding or two.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::op_inputs::{norm_inputs, norm_op};
use super::row_tasks::{filled_by_chunks, VALUES_PER_TASK};
use crate::simd::{dispatch, dot, wide_simd, Build};

/// The norm of `x [..., n]` with weight `w [n]`: this op for f32 on the CPU, else `fallback`
/// (candle's).
pub(crate) fn rms_norm_rows(
    x: &Tensor,
    w: &Tensor,
    eps: f64,
    fallback: impl FnOnce() -> Result<Tensor>,
) -> Result<Tensor> {
    norm_op(x, w, fallback, |x, w| {
        x.apply_op2_no_bwd(w, &RmsNormRows { eps: eps as f32 })
    })
}

struct RmsNormRows {
    eps: f32,
}

impl CustomOp2 for RmsNormRows {
    fn name(&self) -> &'static str {
        "rms-norm-rows"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = norm_inputs("rms-norm-rows", (xs, xl), (ws, wl))?;
        let n = w.len();
        let per_task = (VALUES_PER_TASK / n).max(1) * n;
        let fill = |at: usize, out: &mut [MaybeUninit<f32>]| {
            let rows = Rows {
                x: &x[at..at + out.len()],
                w,
                eps: self.eps,
            };
            dispatch!(wide_simd(), rows.norm(out));
        };
        // SAFETY: a chunk is whole rows, and `Rows::fill` writes every value of each.
        let out = unsafe { filled_by_chunks(x.len(), per_task, fill) };
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// Whole rows of `x`, each as long as `w`.
struct Rows<'a> {
    x: &'a [f32],
    w: &'a [f32],
    eps: f32,
}

impl Rows<'_> {
    /// # Safety
    /// The CPU must have `B`'s features.
    unsafe fn norm<B: Build>(&self, out: &mut [MaybeUninit<f32>]) {
        // SAFETY: passed on from the caller.
        unsafe { B::run(|| self.fill(out)) }
    }

    #[inline(always)]
    fn fill(&self, out: &mut [MaybeUninit<f32>]) {
        let n = self.w.len();
        for (row, out) in self.x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
            let r = 1.0 / (dot(row, row) / n as f32 + self.eps).sqrt();
            for ((o, &v), &a) in out.iter_mut().zip(row).zip(self.w) {
                o.write(v * r * a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support;
    use candle_core::Device;

    const EPS: f64 = 1e-6;

    fn norm(x: &[f32], w: &[f32]) -> Vec<f32> {
        let dev = Device::Cpu;
        let rows = x.len() / w.len();
        let xt = Tensor::from_slice(x, (rows, w.len()), &dev).unwrap();
        let wt = Tensor::from_slice(w, w.len(), &dev).unwrap();
        rms_norm_rows(&xt, &wt, EPS, || {
            unreachable!("f32 on the CPU takes the op")
        })
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
    }

    #[test]
    fn equals_the_norm_in_f64_within_1e_6() {
        // Widths below one lane group, with a remainder, the model's; row counts within one
        // task and past it (threads).
        for (n, rows) in [(1usize, 3usize), (7, 5), (64, 188), (256, 47), (259, 200)] {
            let (x, w) = (
                test_support::values(n * rows, 1),
                test_support::values(n, 2),
            );
            let got = norm(&x, &w);
            for (r, row) in x.chunks(n).enumerate() {
                let sum: f64 = row.iter().map(|&v| v as f64 * v as f64).sum();
                let m = (sum / n as f64 + EPS).sqrt();
                for i in 0..n {
                    let want = row[i] as f64 / m * w[i] as f64;
                    let err = (got[r * n + i] as f64 - want).abs();
                    assert!(
                        err <= 1e-6 * want.abs().max(1e-3),
                        "{n} wide, row {r} at {i}: {} vs {want}",
                        got[r * n + i]
                    );
                }
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_as_among_others() {
        let w = Tensor::from_vec(test_support::values(256, 4), 256, &Device::Cpu).unwrap();
        test_support::assert_rows_independent_of_batch(&test_support::matrix(100, 256, 3), |x| {
            rms_norm_rows(x, &w, EPS, || unreachable!()).unwrap()
        });
    }

    #[test]
    fn every_build_gives_the_same_bits() {
        if !wide_simd() {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        let (n, rows) = (259, 9);
        let (x, w) = (
            test_support::values(n * rows, 5),
            test_support::values(n, 6),
        );
        let input = Rows {
            x: &x,
            w: &w,
            eps: EPS as f32,
        };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        // SAFETY (all three): the portable build needs nothing; AVX2 was checked above,
        // AVX-512 is checked before its run.
        let portable = test_support::written(x.len(), |out| unsafe {
            input.norm::<crate::simd::Portable>(out)
        });
        let avx2 = test_support::written(x.len(), |out| unsafe {
            input.norm::<crate::simd::Avx2>(out)
        });
        assert_eq!(bits(&portable), bits(&avx2));
        if crate::simd::avx512() {
            let avx512 = test_support::written(x.len(), |out| unsafe {
                input.norm::<crate::simd::Avx512>(out)
            });
            assert_eq!(bits(&portable), bits(&avx512));
        }
    }
}
