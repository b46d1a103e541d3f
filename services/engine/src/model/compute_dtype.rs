//! The dtype a model's weights and activations take on a GPU: f32 (the default), or bf16 / f16
//! as GPU serving engines run by default: candle's CUDA kernels and cuBLAS in the narrow type,
//! and the tensor-core attention kernel over KV pages of that type (f32 takes the CUDA-core
//! one). On the CPU the model computes in f32; there `MatmulPrecision::Bf16` rounds the products'
//! inputs to bf16 on the AMX units instead.

use candle_core::{DType, Device};

use crate::error::{EngineError, Result};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ComputeDtype {
    #[default]
    F32,
    Bf16,
    F16,
}

impl ComputeDtype {
    pub fn dtype(self) -> DType {
        match self {
            ComputeDtype::F32 => DType::F32,
            ComputeDtype::Bf16 => DType::BF16,
            ComputeDtype::F16 => DType::F16,
        }
    }

    /// Whether a model on `device` computes in `self`: the narrow types on a GPU only.
    pub fn check(self, device: &Device) -> Result<()> {
        if self == ComputeDtype::F32 || !device.is_cpu() {
            return Ok(());
        }
        Err(EngineError::Input(format!(
            "dtype {self} runs on a GPU (--device cuda); on the CPU the model computes in f32, \
             and --matmul-precision bf16 rounds its products to bf16 on the AMX units"
        )))
    }
}

impl std::str::FromStr for ComputeDtype {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(ComputeDtype::F32),
            "bf16" => Ok(ComputeDtype::Bf16),
            "f16" => Ok(ComputeDtype::F16),
            other => Err(EngineError::Input(format!(
                "dtype is {other:?}; it must be f32, bf16 or f16"
            ))),
        }
    }
}

impl std::fmt::Display for ComputeDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ComputeDtype::F32 => "f32",
            ComputeDtype::Bf16 => "bf16",
            ComputeDtype::F16 => "f16",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_a_bad_one_is_named() {
        for d in [ComputeDtype::F32, ComputeDtype::Bf16, ComputeDtype::F16] {
            assert_eq!(d.to_string().parse::<ComputeDtype>().unwrap(), d);
        }
        let e = "fp8".parse::<ComputeDtype>().unwrap_err().to_string();
        assert!(e.contains("fp8") && e.contains("bf16"), "{e}");
    }

    #[test]
    fn the_cpu_refuses_the_narrow_types_and_says_what_to_use() {
        assert!(ComputeDtype::F32.check(&Device::Cpu).is_ok());
        let e = ComputeDtype::Bf16
            .check(&Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("GPU") && e.contains("--matmul-precision"), "{e}");
    }
}
