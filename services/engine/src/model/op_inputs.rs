//! What the engine's custom candle ops share to reach their inputs: an f32 CPU storage as the
//! contiguous slice its layout covers (forward), and a tensor's values on the host (backward).

use candle_core::{CpuStorage, Layout, Result, Tensor};

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
