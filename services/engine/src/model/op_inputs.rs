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
