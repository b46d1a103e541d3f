//! The MLP's gate, `silu(gate) · up`, in one pass over the two projections' outputs.
//!
//! Why: candle computes it as two ops, `silu` with libm's `expf` one element at a time and then
//! a multiply, each a pass over `[rows, intermediate]`: candle's `silu` alone took 60 µs for
//! 96 × 256 values on the 2-core Xeon, and a step batcher's iteration of 16 sequences gates
//! 64–128 rows × 704 per layer of the shipped model, next to three bf16 matmuls of 50–110 µs
//! each. Here each element is `g / (1 + e^-g) · u` with the lane-wise polynomial exp of
//! [`crate::simd::exp`].
//!
//! Training takes it too: its backward is one pass over gate, up and the output's gradient
//! (candle's is eleven element-wise ops for the two).

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::op_inputs::{equal_pair, f32_cpu, host_values};
use super::row_tasks::{filled_by_chunks, VALUES_PER_TASK};
use crate::simd::{dispatch, exp, wide_simd, Build};

/// `silu(gate) · up`, elementwise: the fused pass for f32 tensors on the CPU (differentiable:
/// its backward is one pass too), candle's ops otherwise.
pub(crate) fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !(f32_cpu(gate) && f32_cpu(up)) || gate.shape() != up.shape() {
        return candle_nn::ops::silu(gate)? * up;
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
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
        let (gate, up) = equal_pair("swiglu", (gs, gl), (us, ul))?;
        let fill = |at: usize, out: &mut [MaybeUninit<f32>]| {
            let span = Span {
                gate: &gate[at..at + out.len()],
                up: &up[at..at + out.len()],
                grad: &[],
            };
            dispatch!(wide_simd(), span.forward(out));
        };
        // SAFETY: `Span::fill` writes one value for each of its chunk's gate values.
        let out = unsafe { filled_by_chunks(gate.len(), VALUES_PER_TASK, fill) };
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }

    /// d gate = dy · u · silu'(g), d up = dy · silu(g), with silu'(g) = s + silu(g) · (1 − s)
    /// for s the sigmoid of g: one pass instead of candle's nine for silu and two for the
    /// product.
    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (g, u, dy) = (host_values(gate)?, host_values(up)?, host_values(grad)?);
        if g.len() != dy.len() {
            candle_core::bail!("swiglu: gradient of {} values for {}", dy.len(), g.len());
        }
        let mut d = vec![0f32; 2 * g.len()];
        let (d_gate, d_up) = d.split_at_mut(g.len());
        d_gate
            .par_chunks_mut(VALUES_PER_TASK)
            .zip(d_up.par_chunks_mut(VALUES_PER_TASK))
            .enumerate()
            .for_each(|(i, (d_gate, d_up))| {
                let at = i * VALUES_PER_TASK;
                let n = d_gate.len();
                let span = Span {
                    gate: &g[at..at + n],
                    up: &u[at..at + n],
                    grad: &dy[at..at + n],
                };
                dispatch!(wide_simd(), span.backward(d_gate, d_up));
            });
        let d_up = d.split_off(g.len());
        Ok((
            Some(Tensor::from_vec(d, gate.shape(), gate.device())?),
            Some(Tensor::from_vec(d_up, up.shape(), up.device())?),
        ))
    }
}

struct Span<'a> {
    gate: &'a [f32],
    up: &'a [f32],
    /// The output's gradient (backward only).
    grad: &'a [f32],
}

impl Span<'_> {
    /// # Safety
    /// The CPU must have `B`'s features.
    unsafe fn forward<B: Build>(&self, out: &mut [MaybeUninit<f32>]) {
        // SAFETY: passed on from the caller.
        unsafe { B::run(|| self.fill(out)) }
    }

    /// # Safety
    /// The CPU must have `B`'s features.
    unsafe fn backward<B: Build>(&self, d_gate: &mut [f32], d_up: &mut [f32]) {
        // SAFETY: passed on from the caller.
        unsafe { B::run(|| self.gradients(d_gate, d_up)) }
    }

    #[inline(always)]
    fn fill(&self, out: &mut [MaybeUninit<f32>]) {
        for ((o, &g), &u) in out.iter_mut().zip(self.gate).zip(self.up) {
            o.write(g / (1.0 + exp(-g)) * u);
        }
    }

    #[inline(always)]
    fn gradients(&self, d_gate: &mut [f32], d_up: &mut [f32]) {
        let inputs = self.gate.iter().zip(self.up).zip(self.grad);
        for ((dg, du), ((&g, &u), &dy)) in d_gate.iter_mut().zip(d_up.iter_mut()).zip(inputs) {
            let s = 1.0 / (1.0 + exp(-g));
            let silu = g * s;
            *du = dy * silu;
            *dg = dy * u * (s + silu * (1.0 - s));
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
        for n in [3usize, 16, 100, 704 * 7, VALUES_PER_TASK * 3 + 5] {
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
    fn the_gradients_equal_those_of_candles_composed_ops() {
        // Past one task, so that the backward's threads split the work too.
        let n = VALUES_PER_TASK + 77;
        let dev = Device::Cpu;
        let gate = candle_core::Var::from_vec(values(n, 5), n, &dev).unwrap();
        let up = candle_core::Var::from_vec(values(n, 6), n, &dev).unwrap();
        let weight = Tensor::from_vec(values(n, 7), n, &dev).unwrap();
        let grads = |y: Tensor| {
            (y * &weight)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        };
        let fused = grads(swiglu(gate.as_tensor(), up.as_tensor()).unwrap());
        let composed =
            grads((candle_nn::ops::silu(gate.as_tensor()).unwrap() * up.as_tensor()).unwrap());
        for (name, var) in [("gate", &gate), ("up", &up)] {
            let got = fused.get(var).unwrap().to_vec1::<f32>().unwrap();
            let want = composed.get(var).unwrap().to_vec1::<f32>().unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                    "d {name} at {i}: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn every_build_gives_the_same_bits() {
        if !wide_simd() {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        let (g, u, dy) = (values(1000, 3), values(1000, 4), values(1000, 8));
        let span = Span {
            gate: &g,
            up: &u,
            grad: &dy,
        };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        #[derive(PartialEq)]
        enum Of {
            Portable,
            Avx2,
            Avx512,
        }
        let run = |build: Of| {
            let (mut out, mut d_gate, mut d_up) = (
                vec![MaybeUninit::new(0f32); 1000],
                vec![0f32; 1000],
                vec![0f32; 1000],
            );
            // SAFETY: the portable build needs nothing; AVX2 was checked above, AVX-512 before
            // its run below.
            unsafe {
                match build {
                    Of::Avx512 => {
                        span.forward::<crate::simd::Avx512>(&mut out);
                        span.backward::<crate::simd::Avx512>(&mut d_gate, &mut d_up);
                    }
                    Of::Avx2 => {
                        span.forward::<crate::simd::Avx2>(&mut out);
                        span.backward::<crate::simd::Avx2>(&mut d_gate, &mut d_up);
                    }
                    Of::Portable => {
                        span.forward::<crate::simd::Portable>(&mut out);
                        span.backward::<crate::simd::Portable>(&mut d_gate, &mut d_up);
                    }
                }
            }
            // SAFETY: `out` started as zeros; the forward only wrote values over them.
            let out: Vec<f32> = out.iter().map(|v| unsafe { v.assume_init() }).collect();
            [bits(&out), bits(&d_gate), bits(&d_up)]
        };
        assert!(run(Of::Portable) == run(Of::Avx2));
        if crate::simd::avx512() {
            assert!(run(Of::Portable) == run(Of::Avx512));
        }
    }
}
