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
    /// Wall seconds the optimiser steps may take, 0 for no limit: after
    /// [`Settings::BUDGET_MEASURED_STEPS`] steps the run lowers `steps` (never raises it) to what
    /// fits at the speed measured so far, once, and keeps the new count in settings.json (so
    /// that `--resume` continues the same schedule). A preset sized on one machine then still
    /// finishes in time on a slower one.
    #[serde(default)]
    pub time_budget_s: f64,
    /// Share of steps, from the start, that train autoregressively (stage 0: block size 1, every
    /// position masked, weight 1), a warm start before block diffusion (SDAR: an AR model adapts
    /// to blocks cheaply). Part of the first `mask_stage_share`; run directories written before
    /// it existed read 0.
    #[serde(default)]
    pub ar_stage_share: f64,
    /// Share of steps up to the end of stage 1 (mask only); the rest is stage 2 (edits).
    pub mask_stage_share: f64,
    /// Share of steps, at the end, of on-policy step reduction (stage 3): the model decodes
    /// continuations of training prefixes greedily, and trains by masking on its own output, so
    /// it grows sure of what it would write anyway and commits more tokens per denoising step.
    /// Run directories written before it existed read 0.
    #[serde(default)]
    pub step_reduction_share: f64,
    /// Prefixes decoded for each round of stage 3 (each continued to the end of its window).
    #[serde(default)]
    pub step_reduction_prompts: usize,
    /// Rounds of stage 3: each decodes afresh with the weights at its first step, so later
    /// rounds train on what the already-sharpened model writes (0 reads as 1).
    #[serde(default)]
    pub step_reduction_rounds: usize,
    /// Block sizes stage 3 draws from (empty: all of BLOCK_SIZES), to train the sizes decoding
    /// will use.
    #[serde(default)]
    pub step_reduction_block_sizes: Vec<usize>,
    /// Share of stage 3's blocks masked from a uniformly drawn cut to their end rather than
    /// position by position: the decoded-prefix, masked-rest states of a left-to-right denoiser.
    #[serde(default)]
    pub step_reduction_suffix_share: f64,
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
                time_budget_s: 0.0,
                ar_stage_share: 0.25,
                mask_stage_share: 0.8,
                step_reduction_share: 0.0,
                step_reduction_prompts: 0,
                step_reduction_rounds: 0,
                step_reduction_block_sizes: Vec::new(),
                step_reduction_suffix_share: 0.0,
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
                // Sized from the measured throughput on the idle 2-core Xeon (AVX-512): about
                // 1,500 tokens/s in stages 0 and 2, which score every position, 1,700 in stage 1
                // (1.2–1.4 s a step): about 80 minutes, leaving room under the 2-hour limit for
                // evaluation. An AVX2-only CPU is slower (the 2-core EPYC of earlier sessions
                // ran 2,200 steps of older code at 720–770 tokens/s).
                steps: 3600,
                // The limit is 2 hours for the whole run: 110 minutes of steps leave
                // room for the evaluations (the final one scores all 207 K held-out tokens).
                // On the Xeon the steps fit (3,600 need ≥ 1,120 tokens/s); on a slower CPU the
                // run takes fewer.
                time_budget_s: 6_600.0,
                // Half the steps autoregressive: every position scored at weight 1 (the masked
                // stage scores about half, weighted 1/t), which is what held-out AR bits/byte
                // measures; the rest adapts the model to blocks (SDAR's recipe).
                ar_stage_share: 0.5,
                mask_stage_share: 0.8,
                step_reduction_share: 0.0,
                step_reduction_prompts: 0,
                step_reduction_rounds: 0,
                step_reduction_block_sizes: Vec::new(),
                step_reduction_suffix_share: 0.0,
                warmup_steps: 50,
                learning_rate: 2e-3,
                min_lr_ratio: 0.1,
                weight_decay: 0.1,
                grad_clip: 1.0,
                eval_every: 720,
                eval_tokens: 8192,
                checkpoint_every: 50,
                seed: 1,
                serve_block_size: 32,
            }),
            // Stage 3 alone, from a trained tiny-code model (`--init`).
            "tiny-code-step-reduction" => {
                let mut s = Self::preset("tiny-code")?;
                s.preset = name.into();
                s.steps = 300;
                s.time_budget_s = 0.0;
                s.ar_stage_share = 0.0;
                s.mask_stage_share = 0.0;
                s.step_reduction_share = 1.0;
                s.step_reduction_prompts = 2048;
                // Blocks masked as suffixes (docs/benchmarks.md): at τ 0.9, a round at share
                // 0.5 raised tokens per forward from 2.20 to 2.51 (B 8) and 2.52 (B 32), and a
                // further one at share 1 to 2.84 and 2.73.
                s.step_reduction_suffix_share = 1.0;
                s.warmup_steps = 20;
                s.learning_rate = 5e-4;
                s.eval_every = 100;
                // After step reduction, blocks of 4 decode fastest at >= 2 tokens per forward on
                // the developer machine (docs/benchmarks.md); 32 pays a 32-row forward per step.
                s.serve_block_size = 4;
                Ok(s)
            }
            other => Err(TrainerError::Input(format!(
                "preset {other:?} is not one of: smoke, tiny-code, tiny-code-step-reduction"
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
        if !(self.time_budget_s.is_finite() && self.time_budget_s >= 0.0) {
            return bad(
                "time_budget_s",
                format!(
                    "is {}; must be seconds >= 0 (0 for no limit)",
                    self.time_budget_s
                ),
            );
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
        if a.num_key_value_heads == 0
            || !a.num_attention_heads.is_multiple_of(a.num_key_value_heads)
        {
            return bad(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads = {}",
                    a.num_key_value_heads, a.num_attention_heads
                ),
            );
        }
        if !a.head_dim.is_multiple_of(2) {
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
        if !(0.0..=1.0).contains(&self.step_reduction_share) {
            return bad(
                "step_reduction_share",
                format!("{} is outside [0, 1]", self.step_reduction_share),
            );
        }
        if !(0.0..=1.0).contains(&self.step_reduction_suffix_share) {
            return bad(
                "step_reduction_suffix_share",
                format!("{} is outside [0, 1]", self.step_reduction_suffix_share),
            );
        }
        if self.step_reduction_share > 0.0 && self.step_reduction_prompts == 0 {
            return bad(
                "step_reduction_prompts",
                "must be at least 1 when step_reduction_share is above 0".into(),
            );
        }
        if let Some(b) = self
            .step_reduction_block_sizes
            .iter()
            .find(|b| !crate::blocks::BLOCK_SIZES.contains(b))
        {
            return bad(
                "step_reduction_block_sizes",
                format!("{b} is not one of {:?}", crate::blocks::BLOCK_SIZES),
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

    /// The first step of stage 3 (`steps` when there is none).
    pub fn step_reduction_from(&self) -> usize {
        self.steps - (self.steps as f64 * self.step_reduction_share).round() as usize
    }

    /// The round of stage 3 that step `step` (0-based, in stage 3) belongs to.
    pub fn step_reduction_round(&self, step: usize) -> usize {
        let (from, rounds) = (
            self.step_reduction_from(),
            self.step_reduction_rounds.max(1),
        );
        (step - from) * rounds / (self.steps - from).max(1)
    }

    /// The first step of round `round` of stage 3.
    pub fn step_reduction_round_start(&self, round: usize) -> usize {
        let (from, rounds) = (
            self.step_reduction_from(),
            self.step_reduction_rounds.max(1),
        );
        from + (round * (self.steps - from)).div_ceil(rounds)
    }

    /// The stage of step `step` (0-based).
    pub fn stage_of(&self, step: usize) -> Stage {
        if step >= self.step_reduction_from() {
            Stage::StepReduction
        } else if step < self.mask_stage_from() {
            Stage::Autoregressive
        } else if step < self.edit_stage_from() {
            Stage::Mask
        } else {
            Stage::Edit
        }
    }

    /// The block sizes stage `stage` draws from.
    pub fn block_sizes(&self, stage: Stage) -> &[usize] {
        match stage {
            Stage::Autoregressive => &[1],
            Stage::StepReduction if !self.step_reduction_block_sizes.is_empty() => {
                &self.step_reduction_block_sizes
            }
            _ => &crate::blocks::BLOCK_SIZES,
        }
    }

    /// `key=value` settings over these (the value as JSON, or else as a string), checked
    /// again as a whole; an unknown key is an error that names it.
    pub fn with_overrides(&self, overrides: &[String]) -> Result<Self, TrainerError> {
        let mut v = serde_json::to_value(self).map_err(|e| TrainerError::Input(e.to_string()))?;
        for o in overrides {
            let (key, value) = o
                .split_once('=')
                .ok_or_else(|| TrainerError::Input(format!("--set {o:?}: expected KEY=VALUE")))?;
            let slot = v
                .get_mut(key)
                .ok_or_else(|| TrainerError::Input(format!("--set: no setting named {key:?}")))?;
            *slot = serde_json::from_str(value)
                .unwrap_or_else(|_| serde_json::Value::String(value.into()));
            // Read back one at a time, so that a value of the wrong type is named with its key.
            serde_json::from_value::<Self>(v.clone())
                .map_err(|e| TrainerError::Input(format!("--set {key}={value}: {e}")))?;
        }
        let s: Self =
            serde_json::from_value(v).map_err(|e| TrainerError::Input(format!("--set: {e}")))?;
        s.validate()?;
        Ok(s)
    }

    /// Clean tokens per optimiser step.
    pub fn tokens_per_step(&self) -> usize {
        self.seq_len * self.batch_size * self.accumulation
    }

    /// Steps run before the time budget is applied (all within warm-up and stage 0 of the
    /// presets that have one, so no stage boundary has passed yet).
    pub const BUDGET_MEASURED_STEPS: usize = 20;

    /// `steps`, lowered to what fits in `time_budget_s` at `seconds_per_step` (at least one
    /// step past the measured ones); `steps` itself when there is no budget.
    pub fn steps_within_budget(&self, seconds_per_step: f64) -> usize {
        if self.time_budget_s <= 0.0 || seconds_per_step <= 0.0 {
            return self.steps;
        }
        let fitting = (self.time_budget_s / seconds_per_step).floor() as usize;
        fitting.max(Self::BUDGET_MEASURED_STEPS + 1).min(self.steps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_set_fields_by_name_and_are_validated() {
        let base = Settings::preset("smoke").unwrap();
        let s = base
            .with_overrides(&[
                "steps=7".into(),
                "step_reduction_block_sizes=[16,32]".into(),
                "preset=mine".into(),
            ])
            .unwrap();
        assert_eq!(s.steps, 7);
        assert_eq!(s.preset, "mine");
        assert_eq!(s.block_sizes(Stage::StepReduction), &[16, 32]);
        assert_eq!(s.block_sizes(Stage::Mask), &crate::blocks::BLOCK_SIZES);
        assert_eq!(s.block_sizes(Stage::Autoregressive), &[1]);
        assert_eq!(
            base.block_sizes(Stage::StepReduction),
            &crate::blocks::BLOCK_SIZES
        );
        for (o, named) in [
            ("stepz=1", "\"stepz\""),
            ("steps", "KEY=VALUE"),
            ("steps=0", "steps"),
            (
                "step_reduction_block_sizes=[3]",
                "step_reduction_block_sizes",
            ),
            ("steps=\"many\"", "steps"),
            ("time_budget_s=-1", "time_budget_s"),
        ] {
            let e = base.with_overrides(&[o.into()]).unwrap_err().to_string();
            assert!(e.contains(named), "{o}: {e}");
        }
    }

    #[test]
    fn a_time_budget_only_lowers_the_steps_to_what_fits() {
        let mut s = Settings::preset("tiny-code").unwrap();
        assert_eq!(s.steps, 3600);
        // 1.2 s a step: 6,600 s hold 5,500 steps, more than the preset's.
        assert_eq!(s.steps_within_budget(1.2), 3600);
        // 2.5 s a step (an AVX2-only CPU): 2,640.
        assert_eq!(s.steps_within_budget(2.5), 2640);
        // Never below one step past the measured ones.
        assert_eq!(
            s.steps_within_budget(1e6),
            Settings::BUDGET_MEASURED_STEPS + 1
        );
        s.time_budget_s = 0.0;
        assert_eq!(s.steps_within_budget(1e6), 3600, "no budget, no limit");
    }
}
