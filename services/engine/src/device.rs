//! The device a model runs on, by the name a user gives it (`--device cpu | cuda | cuda:N`).
//! CUDA runs the model through candle's CUDA backend (cuBLAS matmuls, candle's kernels for the
//! norms, RoPE and softmax); a build without the `cuda` feature says so instead of falling back.

use candle_core::Device;

use crate::error::{EngineError, Result};

/// The device named `name`: `cpu`, `cuda` (ordinal 0) or `cuda:N`.
pub fn device_named(name: &str) -> Result<Device> {
    let ordinal = match name.trim() {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => {
                return Err(EngineError::Input(format!(
                    "device: {name:?} is not one of cpu, cuda, cuda:N"
                )))
            }
        },
    };
    cuda(ordinal)
}

#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal)
        .map_err(|e| EngineError::Input(format!("device: cuda:{ordinal} did not start: {e}")))
}

#[cfg(not(feature = "cuda"))]
fn cuda(ordinal: usize) -> Result<Device> {
    Err(EngineError::Input(format!(
        "device: cuda:{ordinal} needs an sdlm built with `--features cuda` (this one runs on the cpu only)"
    )))
}

#[cfg(test)]
mod tests {
    use super::device_named;

    #[test]
    fn names_map_to_devices_and_bad_names_are_refused_by_field() {
        assert!(device_named("cpu").unwrap().is_cpu());
        for bad in ["gpu", "cuda:x", "cuda:-1", ""] {
            let e = device_named(bad).unwrap_err().to_string();
            assert!(e.starts_with("device:"), "{e}");
        }
        if !cfg!(feature = "cuda") {
            let e = device_named("cuda:1").unwrap_err().to_string();
            assert!(e.contains("--features cuda"), "{e}");
        }
    }
}
