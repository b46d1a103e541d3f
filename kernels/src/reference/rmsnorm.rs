use crate::error::{check_len, KernelError};
use crate::Element;

/// Per row of `hidden` elements: `residual <- round(x + residual)`, then
/// `out <- round(residual * 1/sqrt(mean(residual²) + eps) * weight)`.
pub fn residual_rmsnorm<T: Element>(
    hidden: usize,
    x: &[T],
    residual: &mut [T],
    weight: &[T],
    eps: f32,
    out: &mut [T],
) -> Result<(), KernelError> {
    check_len("weight", weight.len(), hidden)?;
    check_len("residual", residual.len(), x.len())?;
    check_len("out", out.len(), x.len())?;
    if hidden == 0 || !x.len().is_multiple_of(hidden) {
        return Err(KernelError::Length {
            field: "x",
            actual: x.len(),
            expected: hidden.max(1) * (x.len() / hidden.max(1)),
        });
    }
    for ((xr, rr), or) in x
        .chunks(hidden)
        .zip(residual.chunks_mut(hidden))
        .zip(out.chunks_mut(hidden))
    {
        let mut sumsq = 0f32;
        for (xv, rv) in xr.iter().zip(rr.iter_mut()) {
            *rv = T::from_f32(xv.to_f32() + rv.to_f32());
            let z = rv.to_f32();
            sumsq += z * z;
        }
        let inv_rms = 1.0 / (sumsq / hidden as f32 + eps).sqrt();
        for ((o, rv), w) in or.iter_mut().zip(rr.iter()).zip(weight) {
            *o = T::from_f32(rv.to_f32() * inv_rms * w.to_f32());
        }
    }
    Ok(())
}
