use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error(transparent)]
    Engine(#[from] sdlm_engine::EngineError),
    #[error("training diverged: loss {loss}, gradient norm {grad_norm}")]
    Diverged { loss: f64, grad_norm: f64 },
}

impl TrainerError {
    pub(crate) fn file(path: impl Into<PathBuf>, reason: impl ToString) -> Self {
        TrainerError::File {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}
