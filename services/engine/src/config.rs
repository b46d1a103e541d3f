//! Model configuration from an HF `config.json` (qwen2, qwen3, llama), with the diffusion fields
//! taken from `config.json` when present, else from an optional `sdlm.json` beside it.

use std::path::Path;

use serde::Deserialize;

use crate::error::{EngineError, Result};

/// The decoder families that share one implementation (names differ only in config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Qwen2,
    Qwen3,
    Llama,
}

/// Everything the model needs to know about its shape.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    /// Bias on the q/k/v projections (Qwen2 has it; Qwen3 and Llama by default do not).
    pub attention_bias: bool,
    /// Per-head RMSNorm of q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    /// RoPE rotates adjacent pairs (GGUF's llama layout) instead of halves (HF layout).
    pub rope_interleaved: bool,
    /// Tokens that end a generation (config.json's eos_token_id, one id or a list).
    pub eos_token_ids: Vec<u32>,
    pub diffusion: DiffusionConfig,
}

/// The block-diffusion fields; all optional, since AR checkpoints have none.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct DiffusionConfig {
    pub block_size: Option<usize>,
    pub mask_token_id: Option<u32>,
    /// True when position i predicts token i + 1 (Fast-dLLM v2, Dream); false when a position
    /// predicts itself (SDAR, our models).
    pub logits_shift: Option<bool>,
}

/// config.json as HF writes it; only the fields we read.
#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: Option<usize>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    rope_scaling: Option<serde_json::Value>,
    rms_norm_eps: Option<f64>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    use_sliding_window: Option<bool>,
    eos_token_id: Option<serde_json::Value>,
    #[serde(flatten)]
    diffusion: DiffusionConfig,
}

#[derive(Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
}

impl ModelConfig {
    /// Reads `dir/config.json` (and `dir/sdlm.json` for diffusion fields it lacks).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| EngineError::file(&path, e))?;
        let mut config = Self::from_json(&text, &path)?;
        let sidecar = dir.join("sdlm.json");
        if sidecar.exists() {
            let text =
                std::fs::read_to_string(&sidecar).map_err(|e| EngineError::file(&sidecar, e))?;
            let extra: DiffusionConfig =
                serde_json::from_str(&text).map_err(|e| EngineError::file(&sidecar, e))?;
            let d = &mut config.diffusion;
            d.block_size = d.block_size.or(extra.block_size);
            d.mask_token_id = d.mask_token_id.or(extra.mask_token_id);
            d.logits_shift = d.logits_shift.or(extra.logits_shift);
        }
        Ok(config)
    }

    /// Parses config.json text; `path` names the file in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| EngineError::file(path, e))?;
        let path = path.to_path_buf();
        let need = |field: &'static str, v: Option<usize>| -> Result<usize> {
            match v {
                Some(v) if v > 0 => Ok(v),
                Some(_) => Err(config_err(&path, field, "must be positive")),
                None => Err(config_err(&path, field, "is missing")),
            }
        };
        let model_type = raw.model_type.as_deref().unwrap_or("");
        let family = match model_type {
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "llama" => Family::Llama,
            other => {
                return Err(config_err(
                    &path,
                    "model_type",
                    &format!(
                        "{other:?} is not supported; expected \"qwen2\", \"qwen3\" or \"llama\""
                    ),
                ))
            }
        };
        if let Some(scaling) = raw.rope_scaling.as_ref().filter(|v| !v.is_null()) {
            return Err(config_err(
                &path,
                "rope_scaling",
                &format!("{scaling} is not supported; only plain RoPE is"),
            ));
        }
        if raw.use_sliding_window == Some(true) {
            return Err(config_err(
                &path,
                "use_sliding_window",
                "true is not supported; attention is full",
            ));
        }
        if let Some(kind) = raw
            .rope_parameters
            .as_ref()
            .and_then(|r| r.rope_type.as_deref())
        {
            if kind != "default" {
                return Err(config_err(
                    &path,
                    "rope_parameters.rope_type",
                    &format!("{kind:?} is not supported; only \"default\" is"),
                ));
            }
        }
        let hidden_size = need("hidden_size", raw.hidden_size)?;
        let num_attention_heads = need("num_attention_heads", raw.num_attention_heads)?;
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(config_err(
                &path,
                "num_key_value_heads",
                &format!(
                    "{num_key_value_heads} must divide num_attention_heads = {num_attention_heads}"
                ),
            ));
        }
        let head_dim = match raw.head_dim {
            Some(d) => need("head_dim", Some(d))?,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(config_err(
                    &path,
                    "head_dim",
                    "is missing and hidden_size is not a multiple of num_attention_heads",
                ))
            }
        };
        if head_dim % 2 != 0 {
            return Err(config_err(
                &path,
                "head_dim",
                &format!("{head_dim} must be even for RoPE"),
            ));
        }
        let rope_theta = raw
            .rope_theta
            .or(raw.rope_parameters.as_ref().and_then(|r| r.rope_theta))
            .unwrap_or(10_000.0);
        let vocab_size = need("vocab_size", raw.vocab_size)?;
        if let Some(id) = raw.diffusion.mask_token_id {
            if id as usize >= vocab_size {
                return Err(config_err(
                    &path,
                    "mask_token_id",
                    &format!("{id} is outside the vocabulary of {vocab_size}"),
                ));
            }
        }
        Ok(Self {
            family,
            vocab_size,
            hidden_size,
            intermediate_size: need("intermediate_size", raw.intermediate_size)?,
            num_hidden_layers: need("num_hidden_layers", raw.num_hidden_layers)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            rope_theta,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            // HF's Qwen2 always has q/k/v bias and no attention_bias field.
            attention_bias: raw.attention_bias.unwrap_or(family == Family::Qwen2),
            qk_norm: family == Family::Qwen3,
            rope_interleaved: false,
            eos_token_ids: match &raw.eos_token_id {
                Some(serde_json::Value::Number(n)) => {
                    n.as_u64().map(|v| vec![v as u32]).unwrap_or_default()
                }
                Some(serde_json::Value::Array(a)) => a
                    .iter()
                    .filter_map(|v| v.as_u64())
                    .map(|v| v as u32)
                    .collect(),
                _ => Vec::new(),
            },
            diffusion: raw.diffusion,
        })
    }
}

fn config_err(path: &Path, field: &'static str, reason: &str) -> EngineError {
    EngineError::Config {
        path: path.to_path_buf(),
        field,
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig> {
        ModelConfig::from_json(json, Path::new("config.json"))
    }

    const QWEN3: &str = r#"{"model_type":"qwen3","vocab_size":100,"hidden_size":32,
        "intermediate_size":64,"num_hidden_layers":2,"num_attention_heads":4,
        "num_key_value_heads":2,"head_dim":16,"rope_parameters":{"rope_theta":5000.0,"rope_type":"default"},
        "tie_word_embeddings":false,"block_size":4,"mask_token_id":99,"logits_shift":false}"#;

    #[test]
    fn qwen3_reads_explicit_head_dim_nested_rope_theta_and_diffusion_fields() {
        let c = parse(QWEN3).unwrap();
        assert_eq!(c.family, Family::Qwen3);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rope_theta, 5000.0);
        assert!(c.qk_norm && !c.attention_bias && !c.tie_word_embeddings);
        assert_eq!(c.diffusion.block_size, Some(4));
        assert_eq!(c.diffusion.mask_token_id, Some(99));
        assert_eq!(c.diffusion.logits_shift, Some(false));
    }

    #[test]
    fn qwen2_defaults_to_bias_and_derives_head_dim() {
        let c = parse(
            r#"{"model_type":"qwen2","vocab_size":10,"hidden_size":32,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":4,"num_key_value_heads":2,"rope_theta":1e6,
            "tie_word_embeddings":true}"#,
        )
        .unwrap();
        assert!(c.attention_bias && c.tie_word_embeddings && !c.qk_norm);
        assert_eq!((c.head_dim, c.rope_theta), (8, 1e6));
    }

    #[test]
    fn unknown_model_type_names_the_field_and_the_choices() {
        let err = parse(r#"{"model_type":"gpt2"}"#).unwrap_err().to_string();
        assert!(
            err.contains("config.json: model_type") && err.contains("qwen3"),
            "{err}"
        );
    }

    #[test]
    fn mask_token_outside_vocabulary_is_refused() {
        let err = parse(&QWEN3.replace("\"mask_token_id\":99", "\"mask_token_id\":100"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mask_token_id") && err.contains("100"),
            "{err}"
        );
    }
}
