//! The element types the kernels read and write. Arithmetic is always f32; inputs are widened on
//! load and outputs rounded to nearest even on store, on the CPU and on the GPU alike.

use half::{bf16, f16};

/// A storage type of activations, weights and cache pages.
pub trait Element: Copy + Default + Send + Sync + std::fmt::Debug + 'static {
    /// The suffix of this type's CUDA kernels (`paged_attention_bf16_d64`, ...).
    const NAME: &'static str;
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}

impl Element for f32 {
    const NAME: &'static str = "f32";
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for bf16 {
    const NAME: &'static str = "bf16";
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

impl Element for f16 {
    const NAME: &'static str = "f16";
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}
