//! sdlm-kernels: the numeric kernels of block-diffusion serving, twice.
//!
//! [`reference`] holds plain Rust implementations (the CPU path and the oracle); with the `cuda`
//! feature, [`cuda`] runs the same math as CUDA kernels compiled from `cuda/*.cu`. Every CUDA
//! kernel has a parity test against its reference on fresh random inputs (`tests/cuda_parity.rs`).
//!
//! Kernels: paged attention over a ragged batch of query blocks, scatter of a committed block's
//! K/V into cache pages, residual add + RMSNorm, RoPE in place, and confidence selection for a
//! denoising step (per-row arg max and probability, then the threshold / at-least-one rule).

mod element;
mod error;
mod launch;
mod layout;
pub mod reference;

#[cfg(feature = "cuda")]
pub mod cuda;

pub use element::Element;
pub use error::{check_len, KernelError};
pub use layout::{AttentionShape, BatchStats, RaggedBatch};
