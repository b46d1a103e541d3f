use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::{EngineError, Result};

/// The model directory's `tokenizer.json`.
pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    Tokenizer::from_file(&path).map_err(|e| EngineError::file(&path, e))
}
