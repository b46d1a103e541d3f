/// Why a kernel call was refused or failed. Messages name the argument and the limit.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{field} has {actual} elements; expected {expected}")]
    Length {
        field: &'static str,
        actual: usize,
        expected: usize,
    },
    #[error("{field} is {value}; {limit}")]
    OutOfRange {
        field: &'static str,
        value: i64,
        limit: String,
    },
    #[error("unsupported {what}: {detail}")]
    Unsupported { what: &'static str, detail: String },
    #[cfg(feature = "cuda")]
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[cfg(feature = "cuda")]
    #[error("CUDA kernel {0} is missing from the compiled modules")]
    MissingKernel(String),
}

/// A length check that names the argument; shared with the engine's CPU kernels.
pub fn check_len(field: &'static str, actual: usize, expected: usize) -> Result<(), KernelError> {
    if actual == expected {
        Ok(())
    } else {
        Err(KernelError::Length {
            field,
            actual,
            expected,
        })
    }
}
