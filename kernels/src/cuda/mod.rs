//! The CUDA kernels of `cuda/*.cu`, loaded from the fat binaries that build.rs embeds, and their
//! launches. Every launch checks its arguments on the host first (the same checks as the
//! reference), so a kernel never follows an index that points outside its buffers.

mod attention;
mod elementwise;
mod selection;

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaStream, DeviceRepr, ValidAsZeroBits};
use cudarc::nvrtc::Ptx;

use crate::{Element, KernelError};

pub use attention::{
    AttentionKernel, AttentionOptions, AttentionWorkspace, DeviceRaggedBatch, SplitPolicy,
};
pub use elementwise::DeviceRopeTable;
pub use selection::SelectionOutputs;

mod modules {
    include!(concat!(env!("OUT_DIR"), "/modules.rs"));
}

/// Functions every module exports, by name prefix; dtype and head_dim suffixes are added.
const DTYPES: &[&str] = &["f32", "bf16", "f16"];
/// Head dims the attention kernel is instantiated for.
pub const ATTENTION_HEAD_DIMS: &[usize] = &[64, 128];

/// An element type with CUDA kernels.
pub trait CudaElement: Element + DeviceRepr + ValidAsZeroBits + Unpin {}
impl CudaElement for f32 {}
impl CudaElement for half::bf16 {}
impl CudaElement for half::f16 {}

/// The loaded kernels, bound to one stream.
pub struct CudaKernels {
    stream: Arc<CudaStream>,
    functions: HashMap<String, CudaFunction>,
    num_sms: usize,
}

impl CudaKernels {
    /// Loads every module into the stream's context.
    pub fn new(stream: Arc<CudaStream>) -> Result<Self, KernelError> {
        let ctx = stream.context();
        let mut functions = HashMap::new();
        for (module_name, image) in modules::MODULES {
            let module = ctx.load_module(Ptx::from_binary(image.to_vec()))?;
            for name in function_names(module_name) {
                functions.insert(name.clone(), module.load_function(&name)?);
            }
        }
        // The tensor-core attention kernels take more than the default 48 KiB of shared memory.
        for (name, f) in &functions {
            if let Some(kernel) = AttentionKernel::of_function(name) {
                let d: usize = name
                    .rsplit("_d")
                    .next()
                    .and_then(|x| x.parse().ok())
                    .unwrap_or(128);
                let bytes = kernel.dynamic_smem_bytes(d, 2);
                f.set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )?;
            }
        }
        let num_sms = ctx.attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )? as usize;
        Ok(Self {
            stream,
            functions,
            num_sms,
        })
    }

    /// Device 0 with its default stream.
    pub fn on_device(ordinal: usize) -> Result<Self, KernelError> {
        let ctx: Arc<CudaContext> = CudaContext::new(ordinal)?;
        Self::new(ctx.default_stream())
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn num_sms(&self) -> usize {
        self.num_sms
    }

    fn function(&self, name: &str) -> Result<&CudaFunction, KernelError> {
        self.functions
            .get(name)
            .ok_or_else(|| KernelError::MissingKernel(name.to_string()))
    }
}

fn function_names(module: &str) -> Vec<String> {
    let per_dtype = |prefix: &'static str| DTYPES.iter().map(move |d| format!("{prefix}_{d}"));
    match module {
        "attention" => DTYPES
            .iter()
            .flat_map(|d| {
                ATTENTION_HEAD_DIMS
                    .iter()
                    .map(move |hd| format!("paged_attention_{d}_d{hd}"))
            })
            .collect(),
        "attention_tc" => tensor_core_names("paged_attention_tc"),
        "attention_tc_narrow" => tensor_core_names("paged_attention_tcn")
            .into_iter()
            .chain(tensor_core_names("paged_attention_tcn2"))
            .collect(),
        "kv_scatter" => per_dtype("kv_scatter").collect(),
        "rmsnorm" => per_dtype("residual_rmsnorm").collect(),
        "rope" => per_dtype("rope").collect(),
        "confidence" => per_dtype("row_confidence")
            .chain(["select_unmask".to_string()])
            .collect(),
        _ => Vec::new(),
    }
}

/// `{prefix}_{dtype}_d{head_dim}` for the dtypes tensor cores take and every head dim.
fn tensor_core_names(prefix: &str) -> Vec<String> {
    ["bf16", "f16"]
        .iter()
        .flat_map(|d| {
            ATTENTION_HEAD_DIMS
                .iter()
                .map(move |hd| format!("{prefix}_{d}_d{hd}"))
        })
        .collect()
}

fn to_i32(field: &'static str, value: usize) -> Result<i32, KernelError> {
    i32::try_from(value).map_err(|_| KernelError::OutOfRange {
        field,
        value: value as i64,
        limit: format!("must fit in i32 (at most {})", i32::MAX),
    })
}
