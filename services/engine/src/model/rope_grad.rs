//! RoPE (the halves layout: element i turns with element i + d/2, as candle's `rope`) as one
//! differentiable op on the CPU, for training. candle's differentiable form (`rope_slow`) is
//! composed of broadcast multiplies, a negation, concatenations and an add, forward and back,
//! over every query and key of a 512-position training window; here each is one pass.
//!
//! Forward, per pair: y1 = x1·c − x2·s, y2 = x2·c + x1·s. Backward is the turn the other way:
//! dx1 = dy1·c + dy2·s, dx2 = dy2·c − dy1·s. cos and sin are constants of the positions (no
//! gradient).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::op_inputs::{contiguous_f32, f32_cpu, host_values};

/// `x [b, heads, t, d]` turned by `cos`, `sin` `[t, d / 2]`: this op for f32 on the CPU, else
/// `fallback` (candle's composed form).
pub(crate) fn rope_differentiable(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    fallback: impl FnOnce() -> Result<Tensor>,
) -> Result<Tensor> {
    let fits = match (x.dims(), cos.dims(), sin.dims()) {
        (&[_, _, t, d], &[ct, half], &[st, sh]) => {
            d % 2 == 0 && half == d / 2 && sh == half && ct == t && st == t
        }
        _ => false,
    };
    if !(fits && f32_cpu(x) && f32_cpu(cos) && f32_cpu(sin)) {
        return fallback();
    }
    x.contiguous()?.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        RopeGrad { turn: 1.0 },
    )
}

/// The turn by +angle (`turn` 1) or −angle (`turn` −1, the backward).
struct RopeGrad {
    turn: f32,
}

impl RopeGrad {
    /// `x [rows of t × d]` turned, row r at position r % t.
    fn apply(&self, x: &[f32], cos: &[f32], sin: &[f32], t: usize, d: usize) -> Vec<f32> {
        let half = d / 2;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(t * d)
            .zip(x.par_chunks(t * d))
            .for_each(|(out, x)| {
                for (p, (o, x)) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)).enumerate() {
                    let (c, s) = (&cos[p * half..][..half], &sin[p * half..][..half]);
                    let (x1, x2) = x.split_at(half);
                    let (o1, o2) = o.split_at_mut(half);
                    for i in 0..half {
                        let s = self.turn * s[i];
                        o1[i] = x1[i] * c[i] - x2[i] * s;
                        o2[i] = x2[i] * c[i] + x1[i] * s;
                    }
                }
            });
        out
    }
}

impl CustomOp3 for RopeGrad {
    fn name(&self) -> &'static str {
        "rope-differentiable"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (&[_, _, t, d], &[ct, half]) = (xl.dims(), cl.dims()) else {
            candle_core::bail!("rope: x {:?} and cos {:?} do not fit", xl.dims(), cl.dims());
        };
        if ct != t || half * 2 != d || sl.dims() != cl.dims() {
            candle_core::bail!(
                "rope: x {:?}, cos {:?}, sin {:?}",
                xl.dims(),
                cl.dims(),
                sl.dims()
            );
        }
        let x = contiguous_f32("rope", xs, xl)?;
        let (cos, sin) = (
            contiguous_f32("rope", cs, cl)?,
            contiguous_f32("rope", ss, sl)?,
        );
        let out = self.apply(x, cos, sin, t, d);
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (t, d) = (x.dim(2)?, x.dim(3)?);
        let back = RopeGrad { turn: -self.turn };
        let dy = host_values(grad)?;
        let dx = back.apply(&dy, &host_values(cos)?, &host_values(sin)?, t, d);
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            None,
            None,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support::values;
    use candle_core::{Device, Var};

    #[test]
    fn output_and_gradient_equal_candles_composed_rope() {
        let dev = Device::Cpu;
        let (b, h, t, d) = (2, 3, 7, 16);
        let x = Var::from_vec(values(b * h * t * d, 1), (b, h, t, d), &dev).unwrap();
        let cos = Tensor::from_vec(values(t * d / 2, 2), (t, d / 2), &dev).unwrap();
        let sin = Tensor::from_vec(values(t * d / 2, 3), (t, d / 2), &dev).unwrap();
        let weight = Tensor::from_vec(values(b * h * t * d, 4), (b, h, t, d), &dev).unwrap();
        let refused = || {
            Err(candle_core::Error::Msg(
                "f32 on the CPU takes the op".into(),
            ))
        };
        let fused = rope_differentiable(x.as_tensor(), &cos, &sin, refused).unwrap();
        let reference = candle_nn::rotary_emb::rope_slow(x.as_tensor(), &cos, &sin).unwrap();
        let max = |t: Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(max((&fused - &reference).unwrap()) <= 1e-6);
        let grad = |y: &Tensor| {
            let g = (y * &weight)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            g.get(x.as_tensor()).unwrap().clone()
        };
        assert!(max((grad(&fused) - grad(&reference)).unwrap()) <= 1e-6);
    }
}
