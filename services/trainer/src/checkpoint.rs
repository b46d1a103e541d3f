//! Checkpoints: weights, optimiser moments and the trainer's state (step, generator, data
//! position, counters), written to a fresh directory and swapped in by rename, so a crash while
//! saving leaves the previous checkpoint whole.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::DataPosition;
use crate::error::TrainerError;
use crate::learner::Learner;
use crate::prepare::write;
use crate::rng::TrainRng;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimiser steps done.
    pub step: usize,
    pub rng: TrainRng,
    pub data: DataPosition,
    /// Where stage 3 is in the model's own continuations; checkpoints from before it read 0.
    #[serde(default)]
    pub step_reduction_data: DataPosition,
    pub tokens_seen: u64,
    /// Training wall time over all sessions of the run.
    pub elapsed_s: f64,
}

pub fn save(dir: &Path, learner: &Learner, state: &TrainState) -> Result<(), TrainerError> {
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| TrainerError::file(&tmp, e))?;
    let weights = tmp.join("model.safetensors");
    learner
        .varmap
        .save(&weights)
        .map_err(|e| TrainerError::file(&weights, e))?;
    learner.optimizer.save(&tmp.join("optimizer.safetensors"))?;
    let text = serde_json::to_string_pretty(state).map_err(|e| TrainerError::file(&tmp, e))?;
    write(&tmp.join("state.json"), text.as_bytes())?;
    let old = dir.with_extension("old");
    let _ = std::fs::remove_dir_all(&old);
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(|e| TrainerError::file(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| TrainerError::file(dir, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

pub fn load(dir: &Path, learner: &mut Learner) -> Result<TrainState, TrainerError> {
    let state_path = dir.join("state.json");
    let text =
        std::fs::read_to_string(&state_path).map_err(|e| TrainerError::file(&state_path, e))?;
    let state: TrainState =
        serde_json::from_str(&text).map_err(|e| TrainerError::file(&state_path, e))?;
    let weights = dir.join("model.safetensors");
    learner
        .varmap
        .load(&weights)
        .map_err(|e| TrainerError::file(&weights, e))?;
    learner
        .optimizer
        .load(&dir.join("optimizer.safetensors"), state.step)?;
    Ok(state)
}
