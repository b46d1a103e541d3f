//! The KV cache's pages on a CUDA device, and what a paged forward runs per layer there: the
//! kernels' paged attention of the batch's new tokens over their own block and their sequences'
//! pages, then the scatter of the committed rows into the pages (the same math as
//! `kv::paged_attention` and `KvStorage::write` on the CPU). Without the `cuda` feature the
//! types exist but have no values.

#[cfg(feature = "cuda")]
pub(crate) use present::{DeviceBatch, DevicePages};

#[cfg(not(feature = "cuda"))]
pub(crate) use absent::{DeviceBatch, DevicePages};

#[cfg(feature = "cuda")]
mod present {
    use std::sync::Arc;

    use candle_core::cuda_backend::cudarc::driver::CudaSlice;
    use candle_core::cuda_backend::{CudaDevice, CudaStorage};
    use candle_core::op::BackpropOp;
    use candle_core::{DType, Device, Storage, Tensor};
    use sdlm_kernels::cuda::{
        AttentionOptions, AttentionWorkspace, CudaKernels, DeviceRaggedBatch,
    };
    use sdlm_kernels::{AttentionShape, KernelError, RaggedBatch};

    use crate::cuda_ops::{exact_f32, kernels_for};
    use crate::error::{EngineError, Result};

    pub(crate) struct DevicePages {
        kernels: Arc<CudaKernels>,
        device: CudaDevice,
        k: Vec<CudaSlice<f32>>,
        v: Vec<CudaSlice<f32>>,
        workspace: AttentionWorkspace,
    }

    /// A paged forward's batch on the device: the ragged batch's index arrays, and per new
    /// token the slot its K/V row goes to (-1: not committed by this forward).
    pub(crate) struct DeviceBatch {
        ragged: DeviceRaggedBatch,
        slots: CudaSlice<i32>,
        tokens: usize,
    }

    impl DevicePages {
        /// Zeroed pages (`elems` per layer, K and V) on `device`; `None` for a CPU device.
        pub(crate) fn new(device: &Device, layers: usize, elems: usize) -> Result<Option<Self>> {
            let Device::Cuda(device) = device else {
                return Ok(None);
            };
            let kernels = kernels_for(device)?;
            let stream = kernels.stream();
            let zeros = || stream.alloc_zeros::<f32>(elems.max(1));
            let (mut k, mut v) = (Vec::new(), Vec::new());
            for _ in 0..layers {
                k.push(zeros().map_err(KernelError::from)?);
                v.push(zeros().map_err(KernelError::from)?);
            }
            Ok(Some(Self {
                kernels,
                device: device.clone(),
                k,
                v,
                workspace: AttentionWorkspace::default(),
            }))
        }

        /// Copies the batch's index arrays and `slots` (one per new token) to the device, once
        /// per forward for all its layers.
        pub(crate) fn upload_batch(
            &self,
            shape: &AttentionShape,
            batch: &RaggedBatch<'_>,
            slots: &[i32],
        ) -> Result<DeviceBatch> {
            let pages = self.k.first().map_or(0, |k| k.len() / shape.page_elems());
            let ragged = DeviceRaggedBatch::upload(&self.kernels, shape, batch, pages)?;
            let tokens = ragged.stats().num_tokens;
            if slots.len() != tokens {
                return Err(KernelError::Length {
                    field: "slots",
                    actual: slots.len(),
                    expected: tokens,
                }
                .into());
            }
            let upload = if slots.is_empty() { &[-1][..] } else { slots };
            let slots = self
                .kernels
                .stream()
                .clone_htod(upload)
                .map_err(KernelError::from)?;
            Ok(DeviceBatch {
                ragged,
                slots,
                tokens,
            })
        }

        /// Attention of the batch's new tokens (`q`: `[tokens, heads, head_dim]`, `k`/`v`:
        /// `[tokens, kv_heads, head_dim]`, on this device) in `layer`; then their committed rows
        /// are written into the pages. Returns `[tokens, heads × head_dim]` f32.
        #[allow(clippy::too_many_arguments)]
        pub(crate) fn attend_and_commit(
            &mut self,
            layer: usize,
            batch: &DeviceBatch,
            q: &Tensor,
            k: &Tensor,
            v: &Tensor,
            scale: f32,
        ) -> Result<Tensor> {
            let layers = self.k.len();
            let (Some(k_pages), Some(v_pages)) = (self.k.get_mut(layer), self.v.get_mut(layer))
            else {
                return Err(EngineError::Input(format!(
                    "layer {layer}: the KV storage has {layers} layers"
                )));
            };
            let (q, k, v) = (exact_f32(q)?, exact_f32(k)?, exact_f32(v)?);
            let (qs, _) = q.storage_and_layout();
            let (ks, _) = k.storage_and_layout();
            let (vs, _) = v.storage_and_layout();
            let (Storage::Cuda(qs), Storage::Cuda(ks), Storage::Cuda(vs)) = (&*qs, &*ks, &*vs)
            else {
                return Err(EngineError::Input(
                    "paged attention on the device needs q, k and v there".into(),
                ));
            };
            let (q, k, v) = (
                qs.as_cuda_slice::<f32>()?,
                ks.as_cuda_slice::<f32>()?,
                vs.as_cuda_slice::<f32>()?,
            );
            let stream = self.kernels.stream();
            let mut out = stream
                .alloc_zeros::<f32>(q.len().max(1))
                .map_err(KernelError::from)?;
            self.kernels.paged_attention(
                &batch.ragged,
                q,
                k,
                v,
                k_pages,
                v_pages,
                scale,
                &mut out,
                &mut self.workspace,
                AttentionOptions::default(),
            )?;
            if batch.tokens > 0 {
                let row = k.len() / batch.tokens;
                self.kernels
                    .kv_scatter(row, k, v, &batch.slots, k_pages, v_pages)?;
            }
            let rows = batch.tokens;
            let width = q.len() / rows.max(1);
            let storage = CudaStorage::wrap_cuda_slice(out, self.device.clone());
            let out = Tensor::from_storage(
                Storage::Cuda(storage),
                (rows, width),
                BackpropOp::none(),
                false,
            );
            debug_assert_eq!(out.dtype(), DType::F32);
            Ok(out)
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod absent {
    use candle_core::{Device, Tensor};
    use sdlm_kernels::{AttentionShape, RaggedBatch};

    use crate::error::{EngineError, Result};

    pub(crate) enum DevicePages {}
    pub(crate) enum DeviceBatch {}

    impl DevicePages {
        pub(crate) fn new(device: &Device, _layers: usize, _elems: usize) -> Result<Option<Self>> {
            match device {
                Device::Cpu => Ok(None),
                other => Err(EngineError::Input(format!(
                    "KV pages on {other:?} need an sdlm built with `--features cuda`"
                ))),
            }
        }

        pub(crate) fn upload_batch(
            &self,
            _shape: &AttentionShape,
            _batch: &RaggedBatch<'_>,
            _slots: &[i32],
        ) -> Result<DeviceBatch> {
            match *self {}
        }

        pub(crate) fn attend_and_commit(
            &mut self,
            _layer: usize,
            _batch: &DeviceBatch,
            _q: &Tensor,
            _k: &Tensor,
            _v: &Tensor,
            _scale: f32,
        ) -> Result<Tensor> {
            match *self {}
        }
    }
}
