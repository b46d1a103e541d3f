//! Launch of `paged_attention_*` (and its split combine) over a batch already on the device.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{to_i32, CudaElement, CudaKernels, ATTENTION_HEAD_DIMS};
use crate::error::check_len;
use crate::launch::{auto_splits, MAX_SPLITS};
use crate::{AttentionShape, BatchStats, KernelError, RaggedBatch};

/// Which implementation of the attention kernel runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttentionKernel {
    /// Tensor cores for bf16/f16, CUDA cores for f32.
    #[default]
    Auto,
    /// `attention.cu`: f32 arithmetic on CUDA cores, any dtype (the baseline).
    CudaCores,
    /// `attention_tc.cu`: mma.sync on tensor cores, bf16/f16 only.
    TensorCores,
    /// `attention_tc_narrow.cu`: tensor cores with keys on mma's 16-row side and query rows on
    /// its 8-column side, for batches with at most 8 query rows per sequence and kv head (AR
    /// decoding with grouped heads). Correct for any batch, but slow for long queries: every 8
    /// rows stream all their keys. bf16/f16 only.
    TensorCoresNarrow,
    /// `attention_tc_narrow.cu` with each CTA serving two neighbouring kv heads, whose K/V rows
    /// of a key lie side by side in a page: one contiguous read of 2 x head_dim elements a key
    /// instead of two CTAs reading every other head_dim. num_kv_heads must be even.
    TensorCoresNarrowPairs,
}

/// STAGES in attention_tc.cu: K/V tiles in flight per CTA.
const TC_STAGES: usize = 3;

impl AttentionKernel {
    /// (threads, query rows per CTA), matching THREADS and ROWS of each .cu file.
    fn geometry(self, head_dim: usize) -> (u32, usize) {
        match self {
            // D/32 lanes per row
            AttentionKernel::CudaCores | AttentionKernel::Auto => (256, 256 / (head_dim / 32)),
            // 4 warps of 16 rows
            AttentionKernel::TensorCores => (128, 64),
            // 4 warps sharing 8 rows (of each kv head), 16 keys of each tile apiece
            AttentionKernel::TensorCoresNarrow | AttentionKernel::TensorCoresNarrowPairs => {
                (128, 8)
            }
        }
    }

    /// Kv heads one CTA serves (HG in attention_tc_narrow.cu).
    fn kv_heads_per_cta(self) -> usize {
        match self {
            AttentionKernel::TensorCoresNarrowPairs => 2,
            _ => 1,
        }
    }

    fn is_tensor_cores(self) -> bool {
        matches!(
            self,
            AttentionKernel::TensorCores
                | AttentionKernel::TensorCoresNarrow
                | AttentionKernel::TensorCoresNarrowPairs
        )
    }

    /// Dynamic shared memory of one CTA: the tensor-core kernels' K/V stages
    /// (STAGES x 2 x KEYS x (HG x D + 8) elements); the CUDA-core kernel's is static.
    pub(crate) fn dynamic_smem_bytes(self, head_dim: usize, elem_bytes: usize) -> usize {
        if !self.is_tensor_cores() {
            return 0;
        }
        let row = self.kv_heads_per_cta() * head_dim + 8;
        TC_STAGES * 2 * self.keys_per_tile(head_dim) * row * elem_bytes
    }

    /// The kernel of this implementation whose name begins with `name`'s prefix, if any (the
    /// tensor-core kernels take more than the default 48 KiB of shared memory).
    pub(crate) fn of_function(name: &str) -> Option<Self> {
        if name.starts_with("paged_attention_tcn2_") {
            Some(AttentionKernel::TensorCoresNarrowPairs)
        } else if name.starts_with("paged_attention_tcn_") {
            Some(AttentionKernel::TensorCoresNarrow)
        } else if name.starts_with("paged_attention_tc_") {
            Some(AttentionKernel::TensorCores)
        } else {
            None
        }
    }

    /// Keys per shared-memory tile (KEYS in the .cu file); splits are whole tiles.
    fn keys_per_tile(self, head_dim: usize) -> usize {
        match self {
            AttentionKernel::TensorCores if head_dim <= 64 => 64,
            AttentionKernel::TensorCores => 32,
            // 16 keys for each of 4 warps, or of the 2 warps of each kv head
            AttentionKernel::TensorCoresNarrow => 64,
            AttentionKernel::TensorCoresNarrowPairs => 32,
            _ => 4096 / head_dim,
        }
    }
}

/// How a launch is divided; the defaults suit serving.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttentionOptions {
    pub splits: SplitPolicy,
    pub kernel: AttentionKernel,
}

/// The index arrays of a [`RaggedBatch`], validated on the host and copied to the device.
pub struct DeviceRaggedBatch {
    query_starts: CudaSlice<i32>,
    context_lens: CudaSlice<i32>,
    query_blocks: CudaSlice<i32>,
    block_tables: CudaSlice<i32>,
    max_pages_per_seq: usize,
    shape: AttentionShape,
    stats: BatchStats,
}

impl DeviceRaggedBatch {
    pub fn upload(
        kernels: &CudaKernels,
        shape: &AttentionShape,
        batch: &RaggedBatch,
        num_pages: usize,
    ) -> Result<Self, KernelError> {
        let stats = batch.validate(shape, num_pages)?;
        if !shape.page_size.is_power_of_two() {
            return Err(KernelError::Unsupported {
                what: "page_size",
                detail: format!(
                    "{}; the CUDA kernels index pages with shifts, so it must be a power of two",
                    shape.page_size
                ),
            });
        }
        let s = &kernels.stream;
        // An empty block table still needs a valid device pointer.
        let tables: &[i32] = if batch.block_tables.is_empty() {
            &[0]
        } else {
            batch.block_tables
        };
        Ok(Self {
            query_starts: s.clone_htod(batch.query_starts)?,
            context_lens: s.clone_htod(batch.context_lens)?,
            query_blocks: s.clone_htod(batch.query_blocks)?,
            block_tables: s.clone_htod(tables)?,
            max_pages_per_seq: batch.max_pages_per_seq,
            shape: *shape,
            stats,
        })
    }

    pub fn stats(&self) -> BatchStats {
        self.stats
    }
}

/// How the keys of one sequence are divided among CTAs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SplitPolicy {
    /// Enough splits to give every SM work (flash-decoding).
    #[default]
    Auto,
    /// Exactly this many (clamped to the key tiles and to 64); 1 writes the output directly.
    Fixed(usize),
}

/// Scratch for split partial results and the per-row-tile counters that elect the CTA which
/// merges them (split_merge.cuh); grows on demand and is reused across calls. The kernels leave
/// every counter at zero when they finish.
#[derive(Default)]
pub struct AttentionWorkspace {
    acc: Option<CudaSlice<f32>>,
    ml: Option<CudaSlice<f32>>,
    counters: Option<CudaSlice<i32>>,
}

/// The workspace buffers for one launch.
struct SplitBuffers<'a> {
    acc: &'a mut CudaSlice<f32>,
    ml: &'a mut CudaSlice<f32>,
    counters: &'a mut CudaSlice<i32>,
}

fn grown<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    kernels: &CudaKernels,
    slot: &mut Option<CudaSlice<T>>,
    len: usize,
) -> Result<(), KernelError> {
    if slot.as_ref().is_none_or(|a| a.len() < len) {
        *slot = Some(kernels.stream.alloc_zeros(len.max(1))?);
    }
    Ok(())
}

impl AttentionWorkspace {
    fn ensure(
        &mut self,
        kernels: &CudaKernels,
        rows: usize,
        head_dim: usize,
        splits: usize,
        row_tiles: usize,
    ) -> Result<SplitBuffers<'_>, KernelError> {
        grown(kernels, &mut self.acc, rows * head_dim * splits)?;
        grown(kernels, &mut self.ml, rows * 2 * splits)?;
        grown(kernels, &mut self.counters, row_tiles)?;
        match (&mut self.acc, &mut self.ml, &mut self.counters) {
            (Some(acc), Some(ml), Some(counters)) => Ok(SplitBuffers { acc, ml, counters }),
            _ => Err(KernelError::Unsupported {
                what: "workspace",
                detail: "a buffer was not allocated".into(),
            }),
        }
    }
}

impl CudaKernels {
    /// See [`crate::reference::paged_attention`]; `out` is `[tokens, num_heads, head_dim]`.
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention<T: CudaElement>(
        &self,
        batch: &DeviceRaggedBatch,
        q: &CudaSlice<T>,
        k_new: &CudaSlice<T>,
        v_new: &CudaSlice<T>,
        k_pages: &CudaSlice<T>,
        v_pages: &CudaSlice<T>,
        scale: f32,
        out: &mut CudaSlice<T>,
        workspace: &mut AttentionWorkspace,
        options: AttentionOptions,
    ) -> Result<(), KernelError> {
        let shape = batch.shape;
        let stats = batch.stats;
        let (h, kvh, d) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
        if !ATTENTION_HEAD_DIMS.contains(&d) {
            return Err(KernelError::Unsupported {
                what: "head_dim",
                detail: format!(
                    "{d}; the CUDA attention kernel is built for {ATTENTION_HEAD_DIMS:?}"
                ),
            });
        }
        check_len("q", q.len(), stats.num_tokens * h * d)?;
        check_len("out", out.len(), stats.num_tokens * h * d)?;
        check_len("k_new", k_new.len(), stats.num_tokens * kvh * d)?;
        check_len("v_new", v_new.len(), stats.num_tokens * kvh * d)?;
        check_len("v_pages", v_pages.len(), k_pages.len())?;
        if !k_pages.len().is_multiple_of(shape.page_elems()) {
            return Err(KernelError::Length {
                field: "k_pages",
                actual: k_pages.len(),
                expected: k_pages.len() / shape.page_elems() * shape.page_elems(),
            });
        }

        let is_f32 = std::mem::size_of::<T>() == 4;
        let kernel = match options.kernel {
            AttentionKernel::Auto if is_f32 => AttentionKernel::CudaCores,
            AttentionKernel::Auto => AttentionKernel::TensorCores,
            k if k.is_tensor_cores() && is_f32 => {
                return Err(KernelError::Unsupported {
                    what: "dtype",
                    detail: "the tensor-core attention kernels take bf16 or f16, not f32".into(),
                })
            }
            k => k,
        };
        let heads_per_cta = kernel.kv_heads_per_cta();
        if !kvh.is_multiple_of(heads_per_cta) {
            return Err(KernelError::Unsupported {
                what: "num_kv_heads",
                detail: format!(
                    "{kvh}; {kernel:?} serves {heads_per_cta} kv heads per CTA, so it must be a multiple of that"
                ),
            });
        }
        let (threads, rows_per_cta) = kernel.geometry(d);
        let name = match kernel {
            AttentionKernel::TensorCores => format!("paged_attention_tc_{}_d{d}", T::NAME),
            AttentionKernel::TensorCoresNarrow => format!("paged_attention_tcn_{}_d{d}", T::NAME),
            AttentionKernel::TensorCoresNarrowPairs => {
                format!("paged_attention_tcn2_{}_d{d}", T::NAME)
            }
            _ => format!("paged_attention_{}_d{d}", T::NAME),
        };
        let f = self.function(&name)?;
        let smem = kernel.dynamic_smem_bytes(d, std::mem::size_of::<T>());
        let ctas_per_sm = f
            .occupancy_max_active_blocks_per_multiprocessor(threads, smem, None)?
            .max(1) as usize;
        let tile = kernel.keys_per_tile(d);
        let key_tiles = stats.max_keys.div_ceil(tile);
        let q_tiles = (stats.max_query_len * shape.group()).div_ceil(rows_per_cta);
        let head_groups = kvh / heads_per_cta;
        let base_ctas = stats.num_seqs * head_groups * q_tiles;
        let wanted = match options.splits {
            SplitPolicy::Fixed(n) => n.clamp(1, MAX_SPLITS),
            SplitPolicy::Auto => auto_splits(base_ctas, ctas_per_sm * self.num_sms, key_tiles),
        };
        let tiles_per_split = key_tiles.div_ceil(wanted.clamp(1, key_tiles.max(1)));
        let keys_per_split = tiles_per_split * tile;
        let num_splits = stats.max_keys.div_ceil(keys_per_split).max(1);

        let rows = stats.num_tokens * h;
        let row_tiles = q_tiles * stats.num_seqs * kvh;
        let buffers = workspace.ensure(self, rows, d, num_splits, row_tiles)?;

        let cfg = LaunchConfig {
            grid_dim: (
                q_tiles as u32,
                num_splits as u32,
                (stats.num_seqs * head_groups) as u32,
            ),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let ints = [
            to_i32("tokens", stats.num_tokens)?,
            to_i32("num_heads", h)?,
            to_i32("num_kv_heads", kvh)?,
            to_i32("page_size", shape.page_size)?,
            to_i32("max_pages_per_seq", batch.max_pages_per_seq)?,
            to_i32("keys_per_split", keys_per_split)?,
            to_i32("num_splits", num_splits)?,
        ];
        let mut launch = self.stream.launch_builder(f);
        launch
            .arg(q)
            .arg(k_new)
            .arg(v_new)
            .arg(k_pages)
            .arg(v_pages)
            .arg(&batch.block_tables)
            .arg(&batch.context_lens)
            .arg(&batch.query_starts)
            .arg(&batch.query_blocks)
            .arg(&mut *out)
            .arg(buffers.acc)
            .arg(buffers.ml)
            .arg(buffers.counters);
        for v in &ints {
            launch.arg(v);
        }
        launch.arg(&scale);
        // SAFETY: argument order and types match paged_attention_* in attention.cu,
        // attention_tc.cu and attention_tc_narrow.cu (one signature); lengths and
        // every index the kernel follows were checked above and in DeviceRaggedBatch::upload.
        unsafe { launch.launch(cfg) }?;

        Ok(())
    }
}
