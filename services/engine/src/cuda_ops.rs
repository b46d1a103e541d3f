//! The kernels of `sdlm-kernels` run on candle's CUDA tensors, on candle's own stream, so they
//! order with the model's work without any synchronisation of ours.

use candle_core::Tensor;

use crate::decode::Pick;
use crate::error::{EngineError, Result};

/// Per row of `logits` (`[rows, vocab]`, on a CUDA device): the arg max with `banned` excluded
/// and its softmax probability, computed on the device; only two numbers a row come back.
#[cfg(feature = "cuda")]
pub fn greedy_choices_on_device(logits: &Tensor, banned: Option<u32>) -> Result<Vec<Pick>> {
    use candle_core::Storage;

    let (rows, vocab) = logits.dims2()?;
    if rows == 0 {
        return Ok(Vec::new());
    }
    let mut logits = logits.to_dtype(candle_core::DType::F32)?;
    if let Some(b) = banned.map(|b| b as usize).filter(|&b| b < vocab) {
        // -inf takes the token out of the arg max and adds nothing to the softmax sum, as the
        // CPU sampler does.
        let column = Tensor::full(f32::NEG_INFINITY, (rows, 1), logits.device())?;
        logits = logits.slice_assign(&[0..rows, b..b + 1], &column)?;
    }
    // (Already f32 from above; `exact` only makes the buffer the kernel's.)
    let logits = exact(&logits, candle_core::DType::F32)?;
    let (storage, _) = logits.storage_and_layout();
    let Storage::Cuda(storage) = &*storage else {
        return Err(EngineError::Input(format!(
            "greedy choices on the device need logits on a CUDA device, not {:?}",
            logits.device()
        )));
    };
    let kernels = kernels_for(&storage.device)?;
    let mut outputs = sdlm_kernels::cuda::SelectionOutputs::new(&kernels, rows)?;
    kernels.row_confidence(storage.as_cuda_slice::<f32>()?, vocab, 0.0, &mut outputs)?;
    let stream = kernels.stream();
    let driver = |e| EngineError::Kernel(sdlm_kernels::KernelError::Driver(e));
    let tokens = stream.clone_dtoh(&outputs.tokens).map_err(driver)?;
    let confidence = stream.clone_dtoh(&outputs.confidence).map_err(driver)?;
    Ok(tokens
        .iter()
        .zip(&confidence)
        .take(rows)
        .map(|(&token, &confidence)| Pick {
            token: token as u32,
            confidence,
        })
        .collect())
}

/// `t` in `dtype`, in a buffer of its own elements only, from the start, in order: what a
/// kernel that takes a bare device slice reads. Copies only when `t` is not that already.
#[cfg(feature = "cuda")]
pub(crate) fn exact(t: &Tensor, dtype: candle_core::DType) -> Result<Tensor> {
    let t = t.to_dtype(dtype)?;
    Ok(if plain(&t)? { t } else { t.force_contiguous()? })
}

/// Whether `t` is on a CUDA device and its buffer holds exactly its elements, in order.
#[cfg(feature = "cuda")]
fn plain(t: &Tensor) -> Result<bool> {
    use candle_core::{DType, Storage};

    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        return Ok(false);
    };
    let buffer = match t.dtype() {
        DType::F32 => s.as_cuda_slice::<f32>()?.len(),
        DType::BF16 => s.as_cuda_slice::<half::bf16>()?.len(),
        DType::F16 => s.as_cuda_slice::<half::f16>()?.len(),
        _ => return Ok(false),
    };
    Ok(layout.is_contiguous() && layout.start_offset() == 0 && buffer == t.elem_count())
}

/// The kernels loaded into a candle device's context, bound to its stream; loaded once per
/// device (loading every module takes milliseconds).
#[cfg(feature = "cuda")]
pub(crate) fn kernels_for(
    device: &candle_core::cuda_backend::CudaDevice,
) -> Result<std::sync::Arc<sdlm_kernels::cuda::CudaKernels>> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};

    use candle_core::cuda_backend::DeviceId;
    use sdlm_kernels::cuda::CudaKernels;

    static LOADED: OnceLock<Mutex<HashMap<DeviceId, Arc<CudaKernels>>>> = OnceLock::new();
    let mut loaded = LOADED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(k) = loaded.get(&device.id()) {
        return Ok(k.clone());
    }
    let kernels = Arc::new(CudaKernels::new(device.cuda_stream())?);
    loaded.insert(device.id(), kernels.clone());
    Ok(kernels)
}

#[cfg(not(feature = "cuda"))]
pub fn greedy_choices_on_device(_logits: &Tensor, _banned: Option<u32>) -> Result<Vec<Pick>> {
    Err(EngineError::Input(
        "greedy choices on the device need an sdlm built with `--features cuda`".into(),
    ))
}

/// `residual + x` and its RMSNorm (`weight`, `eps`) in one pass of the kernels'
/// `residual_rmsnorm`, the sum written into `residual`'s own storage: returns (the sum, the
/// normed rows). `None` when the tensors are not rows of one dtype (f32, bf16 or f16) that the
/// kernel reads as they are (the caller then composes candle's ops). `residual` must be the
/// forward's own residual stream, which nothing else reads afterwards.
#[cfg(feature = "cuda")]
pub(crate) fn add_rms_norm_in_place(
    residual: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> Result<Option<(Tensor, Tensor)>> {
    use candle_core::{DType, Storage};

    let hidden = weight.elem_count();
    let dtype = residual.dtype();
    let fits = matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
        && x.dtype() == dtype
        && weight.dtype() == dtype
        && residual.shape() == x.shape()
        && residual.dims().last() == Some(&hidden)
        // The kernel reads rows in 16-byte vectors.
        && hidden.is_multiple_of(16 / dtype.size_in_bytes())
        && plain(residual)?
        && plain(x)?
        && plain(weight)?;
    if !fits {
        return Ok(None);
    }
    let op = ResidualRmsNorm {
        eps: eps as f32,
        out: std::sync::Mutex::new(None),
    };
    residual.inplace_op3(x, weight, &op)?;
    let out = op
        .out
        .into_inner()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .ok_or_else(|| EngineError::Input("residual_rmsnorm wrote no output".into()))?;
    let normed = Tensor::from_storage(
        Storage::Cuda(out),
        residual.shape().clone(),
        candle_core::op::BackpropOp::none(),
        false,
    );
    Ok(Some((residual.clone(), normed)))
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn add_rms_norm_in_place(
    _residual: &Tensor,
    _x: &Tensor,
    _weight: &Tensor,
    _eps: f64,
) -> Result<Option<(Tensor, Tensor)>> {
    Ok(None)
}

/// candle's in-place op around the kernel: the residual is the destination, x and the weight
/// are read; the normed rows go to a buffer of their own, kept here for the caller.
#[cfg(feature = "cuda")]
struct ResidualRmsNorm {
    eps: f32,
    out: std::sync::Mutex<Option<candle_core::cuda_backend::CudaStorage>>,
}

#[cfg(feature = "cuda")]
impl ResidualRmsNorm {
    /// The kernel on rows of element type T; returns the normed rows.
    fn run<T: sdlm_kernels::cuda::CudaElement + candle_core::cuda_backend::CudaDType>(
        &self,
        kernels: &sdlm_kernels::cuda::CudaKernels,
        residual: &mut candle_core::cuda_backend::CudaStorage,
        x: &candle_core::cuda_backend::CudaStorage,
        weight: &candle_core::cuda_backend::CudaStorage,
    ) -> candle_core::Result<candle_core::cuda_backend::CudaStorage> {
        let failed = |e: &dyn std::fmt::Display| candle_core::Error::Msg(format!("{e}"));
        let x = x.as_cuda_slice::<T>()?;
        let weight = weight.as_cuda_slice::<T>()?;
        let mut out = kernels
            .stream()
            .alloc_zeros::<T>(x.len())
            .map_err(|e| failed(&e))?;
        kernels
            .residual_rmsnorm(
                weight.len(),
                x,
                residual.as_cuda_slice_mut::<T>()?,
                weight,
                self.eps,
                &mut out,
            )
            .map_err(|e| failed(&e))?;
        Ok(candle_core::cuda_backend::CudaStorage::wrap_cuda_slice(
            out,
            residual.device.clone(),
        ))
    }
}

#[cfg(feature = "cuda")]
impl candle_core::InplaceOp3 for ResidualRmsNorm {
    fn name(&self) -> &'static str {
        "residual_rmsnorm"
    }

    fn cpu_fwd(
        &self,
        _: &mut candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        candle_core::bail!("residual_rmsnorm runs on CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        residual: &mut candle_core::cuda_backend::CudaStorage,
        _: &candle_core::Layout,
        x: &candle_core::cuda_backend::CudaStorage,
        _: &candle_core::Layout,
        weight: &candle_core::cuda_backend::CudaStorage,
        _: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::backend::BackendStorage;
        use candle_core::DType;

        let kernels =
            kernels_for(&residual.device).map_err(|e| candle_core::Error::Msg(format!("{e}")))?;
        let out = match residual.dtype() {
            DType::F32 => self.run::<f32>(&kernels, residual, x, weight)?,
            DType::BF16 => self.run::<half::bf16>(&kernels, residual, x, weight)?,
            DType::F16 => self.run::<half::f16>(&kernels, residual, x, weight)?,
            other => candle_core::bail!("residual_rmsnorm takes f32, bf16 or f16, not {other:?}"),
        };
        *self.out.lock().unwrap_or_else(|p| p.into_inner()) = Some(out);
        Ok(())
    }
}

/// A model's RoPE table on its CUDA device, copied there on first use: the kernels'
/// `rope_inplace` rotates the paged forward's q and k rows (`[tokens, heads, head_dim]`, the
/// layout the attention kernel reads) where they are, so they never go to candle's head-major
/// layout for its rope and back (a copy each way for q, k and v, in every layer).
#[cfg(feature = "cuda")]
#[derive(Default)]
pub(crate) struct DeviceRope(std::sync::OnceLock<sdlm_kernels::cuda::DeviceRopeTable>);

#[cfg(feature = "cuda")]
impl DeviceRope {
    /// `x` (rows `[tokens, heads, head_dim]` on a CUDA device) rotated by the positions of
    /// `batch`'s tokens (checked against `table` by the caller; the kernel leaves a row whose
    /// position is outside the table as it is): in place when `x`'s buffer holds just its
    /// elements, else in a copy.
    pub(crate) fn rotate(
        &self,
        table: &sdlm_kernels::reference::RopeTable,
        x: &Tensor,
        batch: &crate::kv::DeviceBatch,
        heads: usize,
    ) -> Result<Tensor> {
        if x.elem_count() == 0 {
            // No tokens (the batch's positions then hold a placeholder the kernel would refuse).
            return Ok(x.clone());
        }
        let positions = batch.positions();
        let x = exact(x, x.dtype())?;
        let candle_core::Device::Cuda(device) = x.device() else {
            return Err(EngineError::Input(format!(
                "RoPE on the device needs rows on a CUDA device, not {:?}",
                x.device()
            )));
        };
        let kernels = kernels_for(device)?;
        if self.0.get().is_none() {
            // Two threads may both upload; one table is kept, and they are equal.
            let _ = self.0.set(kernels.upload_rope_table(table)?);
        }
        let table = self
            .0
            .get()
            .ok_or_else(|| EngineError::Input("the RoPE table was not uploaded".into()))?;
        x.inplace_op1(&RopeRows {
            kernels: &kernels,
            positions,
            table,
            heads,
        })?;
        Ok(x)
    }
}

/// candle's in-place op around the kernels' `rope_inplace`.
#[cfg(feature = "cuda")]
struct RopeRows<'a> {
    kernels: &'a sdlm_kernels::cuda::CudaKernels,
    positions: &'a candle_core::cuda_backend::cudarc::driver::CudaSlice<i32>,
    table: &'a sdlm_kernels::cuda::DeviceRopeTable,
    heads: usize,
}

#[cfg(feature = "cuda")]
impl RopeRows<'_> {
    fn run<T: sdlm_kernels::cuda::CudaElement + candle_core::cuda_backend::CudaDType>(
        &self,
        x: &mut candle_core::cuda_backend::CudaStorage,
    ) -> candle_core::Result<()> {
        self.kernels
            .rope_inplace(
                x.as_cuda_slice_mut::<T>()?,
                self.positions,
                self.table,
                self.heads,
            )
            .map_err(|e| candle_core::Error::Msg(format!("rope: {e}")))
    }
}

#[cfg(feature = "cuda")]
impl candle_core::InplaceOp1 for RopeRows<'_> {
    fn name(&self) -> &'static str {
        "rope_rows"
    }

    fn cpu_fwd(
        &self,
        _: &mut candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        candle_core::bail!("rope_rows runs on CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        x: &mut candle_core::cuda_backend::CudaStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::backend::BackendStorage;
        use candle_core::DType;

        // `rotate` hands over a plain buffer; the kernel reads it from its start.
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            candle_core::bail!("rope_rows needs contiguous rows from the buffer's start");
        }
        match x.dtype() {
            DType::F32 => self.run::<f32>(x),
            DType::BF16 => self.run::<half::bf16>(x),
            DType::F16 => self.run::<half::f16>(x),
            other => candle_core::bail!("rope_rows takes f32, bf16 or f16, not {other:?}"),
        }
    }
}

/// Without the `cuda` feature there is no device batch, so nothing to rotate.
#[cfg(not(feature = "cuda"))]
#[derive(Default)]
pub(crate) struct DeviceRope;

#[cfg(not(feature = "cuda"))]
impl DeviceRope {
    pub(crate) fn rotate(
        &self,
        _table: &sdlm_kernels::reference::RopeTable,
        _x: &Tensor,
        batch: &crate::kv::DeviceBatch,
        _heads: usize,
    ) -> Result<Tensor> {
        match *batch {}
    }
}

/// Bytes free on `device` now: the GPU's free memory for a CUDA device, `None` for the CPU.
pub fn free_device_memory(device: &candle_core::Device) -> Result<Option<usize>> {
    match device {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(d) => {
            let (free, _total) = d
                .cuda_stream()
                .context()
                .mem_get_info()
                .map_err(sdlm_kernels::KernelError::from)?;
            Ok(Some(free))
        }
        _ => Ok(None),
    }
}
