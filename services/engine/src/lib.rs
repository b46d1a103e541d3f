//! sdlm-engine: the model, its loading, attention masks and (next) decoding for block-diffusion
//! serving. Knows nothing of gRPC; the services reach tensors only through this API.

mod config;
mod cuda_ops;
pub mod decode;
mod device;
mod error;
mod gguf;
mod gguf_tokenizer;
pub mod kv;
mod mask;
mod model;
mod perplexity;
mod simd;
mod switches;
mod tokenizer;
mod weights;

pub use candle_core::{DType, Device, Tensor};
pub use config::{DiffusionConfig, Family, ModelConfig};
pub use cuda_ops::{free_device_memory, greedy_choices_on_device};
pub use device::device_named;
pub use error::{EngineError, Result};
pub use mask::{twin_mask, MaskRule};
pub use model::{
    ComputeDtype, ForwardFuture, KvCache, LogitRows, MatmulPrecision, Model, PagedSeq,
    SequenceCache,
};
pub use perplexity::{score_tokens, Score, TokenScore};
pub use tokenizer::load_tokenizer;
pub use weights::{load_model, open_model, open_model_in, safetensors_files};
