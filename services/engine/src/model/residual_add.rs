//! The residual stream's adds at inference on the CPU, split over rayon's workers like the rest
//! of the forward.
//!
//! Why: candle adds tensors of 64K elements or more on a thread pool of its own, whose worker
//! spins and then parks between ops; in a forward that runs on rayon's workers that is a third
//! thread for two cores. From 64 sequences on in the step batcher (256 rows × 256 of the
//! shipped model) each layer's two adds took that path.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::op_inputs::{equal_pair, f32_cpu};
use super::row_tasks::{filled_by_chunks, VALUES_PER_TASK};

/// `a + b` for tensors of one shape; no backward (inference only).
pub(crate) fn residual_add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !(f32_cpu(a) && f32_cpu(b)) || a.shape() != b.shape() {
        return a + b;
    }
    a.contiguous()?
        .apply_op2_no_bwd(&b.contiguous()?, &ResidualAdd)
}

struct ResidualAdd;

impl CustomOp2 for ResidualAdd {
    fn name(&self) -> &'static str {
        "residual-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = equal_pair("residual add", (s1, l1), (s2, l2))?;
        let fill = |at: usize, out: &mut [std::mem::MaybeUninit<f32>]| {
            let (a, b) = (&a[at..at + out.len()], &b[at..at + out.len()]);
            for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
                o.write(x + y);
            }
        };
        // SAFETY: each chunk's values are written, one for each of its inputs.
        let out = unsafe { filled_by_chunks(a.len(), VALUES_PER_TASK, fill) };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::residual_add;

    #[test]
    fn equals_candles_add_bit_for_bit_below_and_above_one_task() {
        for n in [7usize, 256 * 256 + 3] {
            let a = Tensor::randn(0f32, 1.0, (1, n), &Device::Cpu).unwrap();
            let b = Tensor::randn(0f32, 1.0, (1, n), &Device::Cpu).unwrap();
            let got = residual_add(&a, &b).unwrap().to_vec2::<f32>().unwrap();
            let want = (&a + &b).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(got, want);
        }
    }
}
