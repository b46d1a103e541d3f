//! What the engine's custom candle ops share to reach their inputs: whether a tensor is one
//! they take (f32 on the CPU), an f32 CPU storage as the contiguous slice its layout covers
//! (forward), and a tensor's values on the host (backward).

use candle_core::{CpuStorage, Layout, Result, Tensor};

/// Whether `t` is f32 on the CPU, what the engine's CPU ops take.
pub(crate) fn f32_cpu(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

/// The values of `storage` that `layout` covers; an error naming `op` unless contiguous f32.
pub(crate) fn contiguous_f32<'a>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: inputs must be contiguous"),
    }
}

/// `t`'s values in row-major order, as a host vector.
pub(crate) fn host_values(t: &Tensor) -> Result<Vec<f32>> {
    t.contiguous()?.flatten_all()?.to_vec1::<f32>()
}

/// The two inputs of an elementwise op, contiguous f32 of equal length; an error naming `op`
/// and both lengths otherwise.
pub(crate) fn equal_pair<'a>(
    op: &str,
    (s1, l1): (&'a CpuStorage, &Layout),
    (s2, l2): (&'a CpuStorage, &Layout),
) -> Result<(&'a [f32], &'a [f32])> {
    let (a, b) = (contiguous_f32(op, s1, l1)?, contiguous_f32(op, s2, l2)?);
    if a.len() != b.len() {
        candle_core::bail!("{op}: inputs of {} and {} values", a.len(), b.len());
    }
    Ok((a, b))
}

/// A norm of `x [..., n]` with weight `w [n]`: `apply(x, w)` (both contiguous) where a norm op
/// of the engine takes them (both f32 on the CPU, `w` a vector as long as `x`'s rows), else
/// `fallback()` (candle's).
pub(crate) fn norm_op(
    x: &Tensor,
    w: &Tensor,
    fallback: impl FnOnce() -> Result<Tensor>,
    apply: impl FnOnce(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let takes =
        f32_cpu(x) && f32_cpu(w) && w.rank() == 1 && x.dim(candle_core::D::Minus1)? == w.dim(0)?;
    match takes {
        true => apply(&x.contiguous()?, &w.contiguous()?),
        false => fallback(),
    }
}

/// A norm op's rows and weight, contiguous f32, the rows a whole number of the weight's
/// length; an error naming `op` otherwise.
pub(crate) fn norm_inputs<'a>(
    op: &str,
    (xs, xl): (&'a CpuStorage, &Layout),
    (ws, wl): (&'a CpuStorage, &Layout),
) -> Result<(&'a [f32], &'a [f32])> {
    let (x, w) = (contiguous_f32(op, xs, xl)?, contiguous_f32(op, ws, wl)?);
    let n = w.len();
    if n == 0 || x.len() % n != 0 {
        candle_core::bail!("{op}: x of {} values for a weight of {n}", x.len());
    }
    Ok((x, w))
}
