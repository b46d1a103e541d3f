use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    #[error("{0}")]
    Input(String),
}

impl TrainerError {
    pub(crate) fn file(path: impl Into<PathBuf>, reason: impl ToString) -> Self {
        TrainerError::File {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}
