use std::path::PathBuf;

/// Why the engine refused or failed. Messages name the file or input and the problem.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    #[error("{}: {field}: {reason}", path.display())]
    Config {
        path: PathBuf,
        field: &'static str,
        reason: String,
    },
    #[error("{0}")]
    Input(String),
    #[error("tensor computation: {0}")]
    Candle(#[from] candle_core::Error),
    /// A kernel of sdlm-kernels refused its arguments or failed on the device.
    #[error("kernel: {0}")]
    Kernel(#[from] sdlm_kernels::KernelError),
    /// The paged KV cache had no page for a commit: the step batcher preempts the sequence.
    #[error(transparent)]
    OutOfPages(#[from] crate::kv::OutOfPages),
}

impl EngineError {
    pub(crate) fn file(path: impl Into<PathBuf>, reason: impl ToString) -> Self {
        EngineError::File {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}

pub type Result<T> = std::result::Result<T, EngineError>;
