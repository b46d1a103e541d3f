//! The one set of decoding parameters that the CLI, the services and the benchmarks share,
//! validated in one place.

use crate::config::ModelConfig;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Autoregressive,
    Diffusion,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "autoregressive" | "ar" => Ok(Mode::Autoregressive),
            "diffusion" => Ok(Mode::Diffusion),
            other => Err(format!(
                "mode {other:?} is not one of: autoregressive, diffusion"
            )),
        }
    }
}

/// Every knob of a generation. `Default` is greedy; `for_model` picks the mode and block size.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodingParams {
    pub mode: Mode,
    /// Tokens per diffusion block (1..=256). 1 is autoregressive decoding of the same model.
    pub block_size: usize,
    /// Unmask every masked position whose confidence reaches this, in (0, 1].
    pub threshold: f32,
    pub max_new_tokens: usize,
    /// 0 is greedy.
    pub temperature: f32,
    /// 0 keeps every token.
    pub top_k: usize,
    /// In (0, 1]; 1 keeps every token.
    pub top_p: f32,
    pub seed: u64,
    /// Token ids that end the generation (the model's end-of-sequence ids are added).
    pub stop_token_ids: Vec<u32>,
    /// Texts that end the generation; the completion is cut before the first one.
    pub stop: Vec<String>,
    /// Self-correction: re-predict decoded positions of the open block and replace confident
    /// disagreements (for models trained with edit corruption).
    pub refine: bool,
    pub edit_threshold: f32,
    /// At most this many replacements per block (default B / 4), so decoding always ends.
    pub max_edits_per_block: Option<usize>,
    /// When set, each step unmasks enough positions to finish a block in this many steps.
    pub max_steps_per_block: Option<usize>,
}

impl Default for DecodingParams {
    fn default() -> Self {
        Self {
            mode: Mode::Autoregressive,
            block_size: DEFAULT_BLOCK_SIZE,
            threshold: 0.9,
            max_new_tokens: 128,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            stop_token_ids: Vec::new(),
            stop: Vec::new(),
            refine: false,
            edit_threshold: 0.9,
            max_edits_per_block: None,
            max_steps_per_block: None,
        }
    }
}

/// What validation and defaults need to know of a model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelLimits {
    /// Prompt plus completion tokens.
    pub context: usize,
    pub vocab_size: usize,
    pub has_mask_token: bool,
    /// The block size the model was trained for, if it names one.
    pub block_size: Option<usize>,
}

impl ModelLimits {
    pub fn of(config: &ModelConfig) -> Self {
        Self {
            context: config.max_position_embeddings,
            vocab_size: config.vocab_size,
            has_mask_token: config.diffusion.mask_token_id.is_some(),
            block_size: config.diffusion.block_size,
        }
    }
}

/// Block size when neither the caller nor the model names one (SDAR and Fast-dLLM use 32 or less).
pub const DEFAULT_BLOCK_SIZE: usize = 32;
pub const MAX_BLOCK_SIZE: usize = 256;

impl DecodingParams {
    /// Defaults for this model: diffusion with its block size when it has a mask token,
    /// autoregressive otherwise.
    pub fn for_model(config: &ModelConfig) -> Self {
        Self::for_limits(&ModelLimits::of(config))
    }

    /// [`DecodingParams::for_model`] from what a service knows of a remote model.
    pub fn for_limits(limits: &ModelLimits) -> Self {
        Self {
            mode: if limits.has_mask_token {
                Mode::Diffusion
            } else {
                Mode::Autoregressive
            },
            block_size: limits.block_size.unwrap_or(DEFAULT_BLOCK_SIZE),
            ..Self::default()
        }
    }

    /// Whether a decoder reads nothing of a logits row but its arg max and that token's
    /// probability: temperature 0 (no draws from the distribution) and no self-correction
    /// (which reads every token's probability).
    pub(crate) fn reads_greedy_choices_only(&self) -> bool {
        self.temperature == 0.0 && !self.refine
    }

    /// Checks every field against its range and the model; the message names the field and
    /// the limit.
    pub fn validate(&self, config: &ModelConfig, prompt_tokens: usize) -> Result<(), String> {
        self.validate_for(&ModelLimits::of(config), prompt_tokens)
    }

    /// [`DecodingParams::validate`] against a model known only by its limits (the gateway's
    /// view of a model that workers serve).
    pub fn validate_for(&self, limits: &ModelLimits, prompt_tokens: usize) -> Result<(), String> {
        if !(1..=MAX_BLOCK_SIZE).contains(&self.block_size) {
            return Err(format!(
                "block_size is {}; it must be between 1 and {MAX_BLOCK_SIZE}",
                self.block_size
            ));
        }
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            return Err(format!(
                "threshold is {}; it must be in (0, 1]",
                self.threshold
            ));
        }
        if !(self.edit_threshold > 0.0 && self.edit_threshold <= 1.0) {
            return Err(format!(
                "edit_threshold is {}; it must be in (0, 1]",
                self.edit_threshold
            ));
        }
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature is {}; it must be a finite number >= 0",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p is {}; it must be in (0, 1]", self.top_p));
        }
        if self.max_new_tokens == 0 {
            return Err("max_new_tokens is 0; it must be at least 1".into());
        }
        if self.max_steps_per_block == Some(0) {
            return Err("max_steps_per_block is 0; it must be at least 1 when set".into());
        }
        let context = limits.context;
        if prompt_tokens == 0 {
            return Err("the prompt is empty; it needs at least 1 token".into());
        }
        if prompt_tokens + self.max_new_tokens > context {
            return Err(format!(
                "prompt has {prompt_tokens} tokens and max_new_tokens is {}; together they exceed the model's context of {context}",
                self.max_new_tokens
            ));
        }
        if let Some(&bad) = self
            .stop_token_ids
            .iter()
            .find(|&&t| t as usize >= limits.vocab_size)
        {
            return Err(format!(
                "stop token {bad} is outside the vocabulary of {}",
                limits.vocab_size
            ));
        }
        if self.mode == Mode::Diffusion && !limits.has_mask_token {
            return Err(
                "mode is diffusion but the model has no mask_token_id (config.json or sdlm.json)"
                    .into(),
            );
        }
        Ok(())
    }

    pub fn max_edits(&self) -> usize {
        self.max_edits_per_block.unwrap_or(self.block_size / 4)
    }
}
