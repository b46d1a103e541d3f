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
    use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
    use candle_core::op::BackpropOp;
    use candle_core::{DType, Device, Storage, Tensor};
    use half::{bf16, f16};
    use sdlm_kernels::cuda::{
        AttentionOptions, AttentionWorkspace, CudaElement, CudaKernels, DeviceRaggedBatch,
    };
    use sdlm_kernels::{AttentionShape, KernelError, RaggedBatch};

    use crate::cuda_ops::{exact, kernels_for};
    use crate::error::{EngineError, Result};

    pub(crate) struct DevicePages {
        kernels: Arc<CudaKernels>,
        device: CudaDevice,
        pages: Pages,
        workspace: AttentionWorkspace,
    }

    /// Per layer, the K and V pages in the model's dtype: f32 takes the CUDA-core attention
    /// kernel, bf16 and f16 the tensor-core one.
    enum Pages {
        F32(Vec<(CudaSlice<f32>, CudaSlice<f32>)>),
        Bf16(Vec<(CudaSlice<bf16>, CudaSlice<bf16>)>),
        F16(Vec<(CudaSlice<f16>, CudaSlice<f16>)>),
    }

    impl Pages {
        fn layers(&self) -> usize {
            match self {
                Pages::F32(l) => l.len(),
                Pages::Bf16(l) => l.len(),
                Pages::F16(l) => l.len(),
            }
        }

        /// Elements of one layer's K (or V) pages.
        fn elems(&self) -> usize {
            match self {
                Pages::F32(l) => l.first().map_or(0, |p| p.0.len()),
                Pages::Bf16(l) => l.first().map_or(0, |p| p.0.len()),
                Pages::F16(l) => l.first().map_or(0, |p| p.0.len()),
            }
        }
    }

    /// A paged forward's batch on the device: the ragged batch's index arrays, and per new
    /// token the slot its K/V row goes to (-1: not committed by this forward) and its position
    /// (for RoPE).
    pub(crate) struct DeviceBatch {
        ragged: DeviceRaggedBatch,
        slots: CudaSlice<i32>,
        positions: CudaSlice<i32>,
        tokens: usize,
    }

    impl DeviceBatch {
        /// Each new token's position, on the device.
        pub(crate) fn positions(&self) -> &CudaSlice<i32> {
            &self.positions
        }
    }

    fn zeroed<T: CudaElement>(
        kernels: &CudaKernels,
        layers: usize,
        elems: usize,
    ) -> Result<Vec<(CudaSlice<T>, CudaSlice<T>)>> {
        let stream = kernels.stream();
        let zeros = || {
            stream
                .alloc_zeros::<T>(elems.max(1))
                .map_err(KernelError::from)
        };
        (0..layers).map(|_| Ok((zeros()?, zeros()?))).collect()
    }

    impl DevicePages {
        /// Zeroed pages (`elems` per layer, K and V) in `dtype` on `device`; `None` for a CPU
        /// device.
        pub(crate) fn new(
            device: &Device,
            dtype: DType,
            layers: usize,
            elems: usize,
        ) -> Result<Option<Self>> {
            let Device::Cuda(device) = device else {
                return Ok(None);
            };
            let kernels = kernels_for(device)?;
            let pages = match dtype {
                DType::F32 => Pages::F32(zeroed(&kernels, layers, elems)?),
                DType::BF16 => Pages::Bf16(zeroed(&kernels, layers, elems)?),
                DType::F16 => Pages::F16(zeroed(&kernels, layers, elems)?),
                other => {
                    return Err(EngineError::Input(format!(
                        "KV pages in {other:?}: the attention kernels take f32, bf16 or f16"
                    )))
                }
            };
            Ok(Some(Self {
                kernels,
                device: device.clone(),
                pages,
                workspace: AttentionWorkspace::default(),
            }))
        }

        /// Copies the batch's index arrays, `slots` and `positions` (one each per new token) to
        /// the device, once per forward for all its layers.
        pub(crate) fn upload_batch(
            &self,
            shape: &AttentionShape,
            batch: &RaggedBatch<'_>,
            slots: &[i32],
            positions: &[i32],
        ) -> Result<DeviceBatch> {
            let pages = self.pages.elems() / shape.page_elems();
            let ragged = DeviceRaggedBatch::upload(&self.kernels, shape, batch, pages)?;
            let tokens = ragged.stats().num_tokens;
            let per_token = |field: &'static str, values: &[i32]| -> Result<CudaSlice<i32>> {
                if values.len() != tokens {
                    return Err(KernelError::Length {
                        field,
                        actual: values.len(),
                        expected: tokens,
                    }
                    .into());
                }
                let upload = if values.is_empty() { &[-1][..] } else { values };
                Ok(self
                    .kernels
                    .stream()
                    .clone_htod(upload)
                    .map_err(KernelError::from)?)
            };
            Ok(DeviceBatch {
                slots: per_token("slots", slots)?,
                positions: per_token("positions", positions)?,
                ragged,
                tokens,
            })
        }

        /// Attention of the batch's new tokens (`q`: `[tokens, heads, head_dim]`, `k`/`v`:
        /// `[tokens, kv_heads, head_dim]`, on this device) in `layer`; then their committed rows
        /// are written into the pages. Returns `[tokens, heads × head_dim]` in the pages' dtype.
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
            let layers = self.pages.layers();
            let missing =
                || EngineError::Input(format!("layer {layer}: the KV storage has {layers} layers"));
            let mut run = Attend {
                kernels: &self.kernels,
                device: &self.device,
                workspace: &mut self.workspace,
                batch,
                scale,
            };
            match &mut self.pages {
                Pages::F32(l) => run.layer(l.get_mut(layer).ok_or_else(missing)?, q, k, v),
                Pages::Bf16(l) => run.layer(l.get_mut(layer).ok_or_else(missing)?, q, k, v),
                Pages::F16(l) => run.layer(l.get_mut(layer).ok_or_else(missing)?, q, k, v),
            }
        }
    }

    /// One layer's attention and commit, for pages of element type T.
    struct Attend<'a> {
        kernels: &'a CudaKernels,
        device: &'a CudaDevice,
        workspace: &'a mut AttentionWorkspace,
        batch: &'a DeviceBatch,
        scale: f32,
    }

    impl Attend<'_> {
        fn layer<T: CudaElement + CudaDType + candle_core::WithDType>(
            &mut self,
            (k_pages, v_pages): &mut (CudaSlice<T>, CudaSlice<T>),
            q: &Tensor,
            k: &Tensor,
            v: &Tensor,
        ) -> Result<Tensor> {
            let (q, k, v) = (
                exact(q, T::DTYPE)?,
                exact(k, T::DTYPE)?,
                exact(v, T::DTYPE)?,
            );
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
                qs.as_cuda_slice::<T>()?,
                ks.as_cuda_slice::<T>()?,
                vs.as_cuda_slice::<T>()?,
            );
            let mut out = self
                .kernels
                .stream()
                .alloc_zeros::<T>(q.len().max(1))
                .map_err(KernelError::from)?;
            self.kernels.paged_attention(
                &self.batch.ragged,
                q,
                k,
                v,
                k_pages,
                v_pages,
                self.scale,
                &mut out,
                self.workspace,
                AttentionOptions::default(),
            )?;
            let rows = self.batch.tokens;
            if let Some(row) = k.len().checked_div(rows) {
                self.kernels
                    .kv_scatter(row, k, v, &self.batch.slots, k_pages, v_pages)?;
            }
            let width = q.len() / rows.max(1);
            let storage = CudaStorage::wrap_cuda_slice(out, self.device.clone());
            Ok(Tensor::from_storage(
                Storage::Cuda(storage),
                (rows, width),
                BackpropOp::none(),
                false,
            ))
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
        pub(crate) fn new(
            device: &Device,
            _dtype: candle_core::DType,
            _layers: usize,
            _elems: usize,
        ) -> Result<Option<Self>> {
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
            _positions: &[i32],
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
