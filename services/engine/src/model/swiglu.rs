//! The MLP's gate, `silu(gate) · up`, in one pass over the two projections' outputs.
//!
//! Why: candle computes it as two ops, `silu` with libm's `expf` one element at a time and then
//! a multiply, each a pass over `[rows, intermediate]`: candle's `silu` alone took 60 µs for
//! 96 × 256 values on the 2-core Xeon, and a step batcher's iteration of 16 sequences gates
//! 64–128 rows × 704 per layer of the shipped model, next to three bf16 matmuls of 50–110 µs
//! each. Here each element is `g / (1 + e^-g) · u` with the lane-wise polynomial exp of
//! [`crate::simd::exp`].
//!
//! Decoding only: tensors that carry a gradient (training) keep candle's differentiable ops.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::simd::{dispatch, exp, wide_simd, Build};

/// Lanes the compiler keeps in independent registers, so that the loop vectorises.
const LANES: usize = 16;
/// Elements per task when the work is split across threads.
const PER_TASK: usize = 1 << 14;

/// `silu(gate) · up`, elementwise; the fused pass for f32 tensors on the CPU without gradient,
/// candle's ops otherwise.
pub(crate) fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let plain =
        |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && !t.track_op();
    if !(plain(gate) && plain(up)) || gate.shape() != up.shape() {
        return candle_nn::ops::silu(gate)? * up;
    }
    gate.contiguous()?
        .apply_op2_no_bwd(&up.contiguous()?, &SwiGlu)
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (Some((ga, gb)), Some((ua, ub))) = (gl.contiguous_offsets(), ul.contiguous_offsets())
        else {
            candle_core::bail!("swiglu: gate and up must be contiguous");
        };
        let gate = &gs.as_slice::<f32>()?[ga..gb];
        let up = &us.as_slice::<f32>()?[ua..ub];
        if gate.len() != up.len() {
            candle_core::bail!("swiglu: gate has {} values, up {}", gate.len(), up.len());
        }
        let mut out = vec![0f32; gate.len()];
        let wide = wide_simd();
        let fill = |(i, out): (usize, &mut [f32])| {
            let at = i * PER_TASK;
            let span = Span {
                gate: &gate[at..at + out.len()],
                up: &up[at..at + out.len()],
            };
            dispatch!(wide, span.run(out));
        };
        if out.len() > PER_TASK {
            out.par_chunks_mut(PER_TASK).enumerate().for_each(fill);
        } else {
            out.chunks_mut(PER_TASK).enumerate().for_each(fill);
        }
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }
}

struct Span<'a> {
    gate: &'a [f32],
    up: &'a [f32],
}

impl Span<'_> {
    /// # Safety
    /// The CPU must have `B`'s features.
    unsafe fn run<B: Build>(&self, out: &mut [f32]) {
        // SAFETY: passed on from the caller.
        unsafe { B::run(|| self.fill(out)) }
    }

    #[inline(always)]
    fn fill(&self, out: &mut [f32]) {
        let one = |g: f32, u: f32| g / (1.0 + exp(-g)) * u;
        let mut o = out.chunks_exact_mut(LANES);
        let (mut g, mut u) = (self.gate.chunks_exact(LANES), self.up.chunks_exact(LANES));
        for ((o, g), u) in (&mut o).zip(&mut g).zip(&mut u) {
            for l in 0..LANES {
                o[l] = one(g[l], u[l]);
            }
        }
        let rest = o.into_remainder();
        for ((o, &g), &u) in rest.iter_mut().zip(g.remainder()).zip(u.remainder()) {
            *o = one(g, u);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support;
    use candle_core::Device;

    /// Values in [-12, 12]: past where silu bends.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        test_support::values(n, seed)
            .iter()
            .map(|v| v * 12.0)
            .collect()
    }

    #[test]
    fn the_fused_pass_equals_silu_times_up_in_f64_within_1e_6() {
        // Sizes below one lane group, with a remainder, and past one task (threads).
        for n in [3usize, 16, 100, 704 * 7, PER_TASK * 3 + 5] {
            let (g, u) = (values(n, 1), values(n, 2));
            let gate = Tensor::from_vec(g.clone(), n, &Device::Cpu).unwrap();
            let up = Tensor::from_vec(u.clone(), n, &Device::Cpu).unwrap();
            let got = swiglu(&gate, &up).unwrap().to_vec1::<f32>().unwrap();
            for i in 0..n {
                let (g, u) = (g[i] as f64, u[i] as f64);
                let want = g / (1.0 + (-g).exp()) * u;
                let err = (got[i] as f64 - want).abs();
                assert!(
                    err <= 1e-6 * want.abs().max(1e-3),
                    "n {n} at {i}: {} vs {want}",
                    got[i]
                );
            }
        }
        // Far past exp's range: silu(-200) is -0 to f32, silu(200) is 200.
        let gate = Tensor::new(&[-200f32, 200.0], &Device::Cpu).unwrap();
        let up = Tensor::new(&[1f32, 1.0], &Device::Cpu).unwrap();
        let got = swiglu(&gate, &up).unwrap().to_vec1::<f32>().unwrap();
        assert!(got[0].abs() < 1e-30 && got[1] == 200.0, "{got:?}");
    }

    #[test]
    fn a_tensor_with_a_gradient_takes_candles_ops() {
        let g = candle_core::Var::new(&[0.5f32, -1.0, 2.0], &Device::Cpu).unwrap();
        let up = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
        let y = swiglu(g.as_tensor(), &up).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(g.as_tensor()).is_some(), "the gradient flows");
    }

    #[test]
    fn both_builds_give_the_same_bits() {
        if !wide_simd() {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        let (g, u) = (values(1000, 3), values(1000, 4));
        let span = Span { gate: &g, up: &u };
        let (mut a, mut b) = (vec![0f32; 1000], vec![0f32; 1000]);
        // SAFETY: the portable build needs nothing; AVX2 was checked above.
        unsafe {
            span.run::<crate::simd::Portable>(&mut a);
            span.run::<crate::simd::Avx2>(&mut b);
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b));
    }
}
