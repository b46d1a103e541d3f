//! How a CPU forward multiplies by dense weights: `f32` (the default; exact f32 products, what
//! the parity tests against transformers and llama.cpp check) or `bf16` (inputs and weights
//! rounded to bf16, sums in f32, on the AMX tile units: PyTorch's "medium" f32 matmul precision).

use crate::error::{EngineError, Result};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MatmulPrecision {
    #[default]
    F32,
    Bf16,
}

impl MatmulPrecision {
    /// Whether this machine runs `self`: bf16 needs the CPU device and AMX-BF16.
    pub fn check(self, device: &candle_core::Device) -> Result<()> {
        if self == MatmulPrecision::F32 {
            return Ok(());
        }
        if !device.is_cpu() {
            return Err(EngineError::Input(
                "matmul_precision bf16 is a CPU setting (AMX tiles); on a GPU the model's dtype \
                 decides"
                    .into(),
            ));
        }
        if !super::amx_bf16::available() {
            return Err(EngineError::Input(
                "matmul_precision bf16 needs a CPU with AMX-BF16 (amx_tile and amx_bf16 in \
                 /proc/cpuinfo; Intel Xeon Sapphire Rapids or later) and Linux 5.16+; this one \
                 has not"
                    .into(),
            ));
        }
        Ok(())
    }
}

impl std::str::FromStr for MatmulPrecision {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(MatmulPrecision::F32),
            "bf16" => Ok(MatmulPrecision::Bf16),
            other => Err(EngineError::Input(format!(
                "matmul_precision is {other:?}; it must be f32 or bf16"
            ))),
        }
    }
}

impl std::fmt::Display for MatmulPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MatmulPrecision::F32 => "f32",
            MatmulPrecision::Bf16 => "bf16",
        })
    }
}
