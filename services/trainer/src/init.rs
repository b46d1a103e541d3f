//! A run that starts from a trained model directory (`--init`): its weights instead of random
//! ones and its tokenizer instead of a new one, once its shape is checked against the run's.

use std::path::Path;

use candle_core::{DType, Device};

use crate::error::TrainerError;
use crate::learner::Learner;

/// The config.json fields that must equal the run's for the weights and token ids to fit.
const SHAPE_FIELDS: [&str; 8] = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "mask_token_id",
];

/// Refuses a directory whose config.json differs from `want` (the run's config) in shape.
pub fn check_shape(dir: &Path, want: &serde_json::Value) -> Result<(), TrainerError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| TrainerError::file(&path, e))?;
    let have: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| TrainerError::file(&path, e))?;
    for field in SHAPE_FIELDS {
        if have[field] != want[field] {
            return Err(TrainerError::file(
                &path,
                format!(
                    "{field} is {}; the run's model needs {} (--init takes a model of the preset's shape)",
                    have[field], want[field]
                ),
            ));
        }
    }
    Ok(())
}

/// Sets every weight of `learner` from DIR/model.safetensors (any float type, read as f32).
pub fn load_weights(dir: &Path, learner: &Learner) -> Result<(), TrainerError> {
    let path = dir.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| TrainerError::file(&path, e))?;
    let vars = learner
        .varmap
        .data()
        .lock()
        .map_err(|_| TrainerError::Input("the weights' lock is poisoned".into()))?;
    for (name, var) in vars.iter() {
        let t = tensors
            .get(name)
            .ok_or_else(|| TrainerError::file(&path, format!("has no tensor {name}")))?;
        if t.dims() != var.dims() {
            return Err(TrainerError::file(
                &path,
                format!(
                    "{name} has shape {:?}; the model needs {:?}",
                    t.dims(),
                    var.dims()
                ),
            ));
        }
        var.set(&t.to_dtype(DType::F32)?)?;
    }
    Ok(())
}
