//! What a training run is: the model's shape, the data window, the optimiser schedule and the
//! run's cadence. Presets name tested combinations; a run directory keeps the settings it started
//! with, so `--resume` cannot silently change them.

use serde::{Deserialize, Serialize};

use crate::corrupt::Stage;
use crate::error::TrainerError;

/// The model's shape (a Qwen3-layout decoder: per-head q/k norm, no bias, tied embeddings).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Architecture {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub preset: String,
    pub architecture: Architecture,
    pub vocab_size: usize,
    /// Corpus files read (the first N of the sorted list; 0 = all), for quick runs.
    pub max_files: usize,
    /// Tokens per training window (L; the model reads 2L).
    pub seq_len: usize,
    /// Windows per micro-batch, and micro-batches per optimiser step.
    pub batch_size: usize,
    pub accumulation: usize,
    pub steps: usize,
    /// Share of steps, from the start, that train autoregressively (stage 0: block size 1, every
    /// position masked, weight 1), a warm start before block diffusion (SDAR: an AR model adapts
    /// to blocks cheaply). Part of the first `mask_stage_share`; run directories written before
    /// it existed read 0.
    #[serde(default)]
    pub ar_stage_share: f64,
    /// Share of steps up to the end of stage 1 (mask only); the rest is stage 2 (edits).
    pub mask_stage_share: f64,
    pub warmup_steps: usize,
    pub learning_rate: f64,
    /// The cosine decays to learning_rate · min_lr_ratio.
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub eval_every: usize,
    /// Held-out tokens scored at each periodic evaluation (the final one scores all).
    pub eval_tokens: usize,
    pub checkpoint_every: usize,
    pub seed: u64,
    /// The block size written to config.json (decoding's default).
    pub serve_block_size: usize,
}

impl Settings {
    pub fn preset(name: &str) -> Result<Self, TrainerError> {
        match name {
            "smoke" => Ok(Self {
                preset: name.into(),
                architecture: Architecture {
                    hidden_size: 64,
                    intermediate_size: 128,
                    num_hidden_layers: 2,
                    num_attention_heads: 4,
                    num_key_value_heads: 2,
                    head_dim: 16,
                    rope_theta: 10_000.0,
                },
                vocab_size: 384,
                max_files: 30,
                seq_len: 64,
                batch_size: 4,
                accumulation: 2,
                steps: 40,
                ar_stage_share: 0.25,
                mask_stage_share: 0.8,
                warmup_steps: 5,
                learning_rate: 3e-3,
                min_lr_ratio: 0.1,
                weight_decay: 0.1,
                grad_clip: 1.0,
                eval_every: 20,
                eval_tokens: 1024,
                checkpoint_every: 20,
                seed: 1,
                serve_block_size: 8,
            }),
            "tiny-code" => Ok(Self {
                preset: name.into(),
                architecture: Architecture {
                    hidden_size: 256,
                    intermediate_size: 704,
                    num_hidden_layers: 4,
                    num_attention_heads: 4,
                    num_key_value_heads: 2,
                    head_dim: 64,
                    rope_theta: 10_000.0,
                },
                vocab_size: 8192,
                max_files: 0,
                seq_len: 256,
                // 4 × 2 rather than 8 × 1: the same 2,048 tokens per step with activations small
                // enough for the allocator to reuse (measured as fast or faster).
                batch_size: 4,
                accumulation: 2,
                // Sized from the measured throughput on the idle 2-core machine: 800–860
                // tokens/s in stage 1 (2.5 s a step), less in stage 2, which scores every
                // position: about 105 minutes, leaving room under the 2-hour limit for evaluation.
                steps: 2200,
                // Half the steps autoregressive: every position scored at weight 1 (the masked
                // stage scores about half, weighted 1/t), which is what held-out AR bits/byte
                // measures; the rest adapts the model to blocks (SDAR's recipe).
                ar_stage_share: 0.5,
                mask_stage_share: 0.8,
                warmup_steps: 50,
                learning_rate: 2e-3,
                min_lr_ratio: 0.1,
                weight_decay: 0.1,
                grad_clip: 1.0,
                eval_every: 440,
                eval_tokens: 8192,
                checkpoint_every: 50,
                seed: 1,
                serve_block_size: 32,
            }),
            other => Err(TrainerError::Input(format!(
                "preset {other:?} is not one of: smoke, tiny-code"
            ))),
        }
    }

    /// Checks the combination once, with errors naming the field.
    pub fn validate(&self) -> Result<(), TrainerError> {
        let a = &self.architecture;
        let bad = |field: &str, why: String| Err(TrainerError::Input(format!("{field}: {why}")));
        if self.steps == 0 {
            return bad("steps", "must be at least 1".into());
        }
        if self.seq_len < 2 {
            return bad(
                "seq_len",
                format!("is {}; must be at least 2", self.seq_len),
            );
        }
        if self.batch_size == 0 || self.accumulation == 0 {
            return bad(
                "batch_size",
                "batch_size and accumulation must be at least 1".into(),
            );
        }
        if a.num_key_value_heads == 0 || a.num_attention_heads % a.num_key_value_heads != 0 {
            return bad(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads = {}",
                    a.num_key_value_heads, a.num_attention_heads
                ),
            );
        }
        if a.head_dim % 2 != 0 {
            return bad(
                "head_dim",
                format!("is {}; RoPE needs an even size", a.head_dim),
            );
        }
        if !(0.0..=1.0).contains(&self.mask_stage_share) {
            return bad(
                "mask_stage_share",
                format!("{} is outside [0, 1]", self.mask_stage_share),
            );
        }
        if !(0.0..=self.mask_stage_share).contains(&self.ar_stage_share) {
            return bad(
                "ar_stage_share",
                format!(
                    "{} is outside [0, mask_stage_share = {}]",
                    self.ar_stage_share, self.mask_stage_share
                ),
            );
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return bad(
                "learning_rate",
                format!("{} must be positive", self.learning_rate),
            );
        }
        Ok(())
    }

    /// The first step of stage 1.
    pub fn mask_stage_from(&self) -> usize {
        (self.steps as f64 * self.ar_stage_share).round() as usize
    }

    /// The first step of stage 2.
    pub fn edit_stage_from(&self) -> usize {
        (self.steps as f64 * self.mask_stage_share).round() as usize
    }

    /// The stage of step `step` (0-based).
    pub fn stage_of(&self, step: usize) -> Stage {
        if step < self.mask_stage_from() {
            Stage::Autoregressive
        } else if step < self.edit_stage_from() {
            Stage::Mask
        } else {
            Stage::Edit
        }
    }

    /// Clean tokens per optimiser step.
    pub fn tokens_per_step(&self) -> usize {
        self.seq_len * self.batch_size * self.accumulation
    }
}
