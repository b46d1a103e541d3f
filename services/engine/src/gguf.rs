//! A model from one GGUF file (llama.cpp's format): configuration from its metadata, weights
//! through candle's quantized matmul (F32, F16, Q4_0, Q4_1, Q4_K, Q5_0, Q5_K, Q6_K, Q8_0, ...),
//! and the tokenizer from its `tokenizer.ggml.*` entries, so the one file is enough.

use std::cell::RefCell;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_nn::RmsNorm;

use crate::config::{DiffusionConfig, Family, ModelConfig};
use crate::error::{EngineError, Result};
use crate::model::source::{Proj, WeightSource};
use crate::model::Model;

pub(crate) struct GgufFile {
    path: PathBuf,
    content: gguf_file::Content,
    reader: RefCell<File>,
    device: Device,
}

impl GgufFile {
    pub(crate) fn open(path: &Path, device: &Device) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| EngineError::file(path, e))?;
        let content =
            gguf_file::Content::read(&mut file).map_err(|e| EngineError::file(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            reader: RefCell::new(file),
            device: device.clone(),
        })
    }

    pub(crate) fn meta(&self, key: &str) -> Option<&gguf_file::Value> {
        self.content.metadata.get(key)
    }

    pub(crate) fn meta_u32(&self, key: &str) -> Result<Option<u32>> {
        self.meta(key)
            .map(|v| v.to_u32().or_else(|_| v.to_u64().map(|x| x as u32)))
            .transpose()
            .map_err(|e| self.err(format!("metadata {key}: {e}")))
    }

    pub(crate) fn meta_f32(&self, key: &str) -> Result<Option<f32>> {
        self.meta(key)
            .map(|v| v.to_f32())
            .transpose()
            .map_err(|e| self.err(format!("metadata {key}: {e}")))
    }

    pub(crate) fn meta_str(&self, key: &str) -> Option<&str> {
        self.meta(key)
            .and_then(|v| v.to_string().ok())
            .map(|s| s.as_str())
    }

    pub(crate) fn err(&self, reason: impl ToString) -> EngineError {
        EngineError::file(&self.path, reason)
    }

    fn qtensor(&self, name: &str) -> candle_core::Result<candle_core::quantized::QTensor> {
        let mut reader = self.reader.borrow_mut();
        self.content.tensor(&mut *reader, name, &self.device)
    }

    fn dense(&self, name: &str, shape: &[usize]) -> candle_core::Result<Tensor> {
        let t = self.qtensor(name)?.dequantize(&self.device)?;
        if t.dims() != shape {
            candle_core::bail!(
                "shape mismatch for {name}, expected: {shape:?}, got: {:?}",
                t.dims()
            );
        }
        Ok(t)
    }

    pub(crate) fn config(&self) -> Result<ModelConfig> {
        let arch = self
            .meta_str("general.architecture")
            .ok_or_else(|| self.err("metadata general.architecture is missing"))?
            .to_string();
        let family = match arch.as_str() {
            "qwen2" => Family::Qwen2,
            "llama" => Family::Llama,
            other => {
                return Err(self.err(format!(
                "general.architecture {other:?} is not supported; expected \"qwen2\" or \"llama\""
            )))
            }
        };
        let need = |key: &str| -> Result<usize> {
            self.meta_u32(&format!("{arch}.{key}"))?
                .map(|v| v as usize)
                .filter(|&v| v > 0)
                .ok_or_else(|| self.err(format!("metadata {arch}.{key} is missing or zero")))
        };
        let hidden_size = need("embedding_length")?;
        let heads = need("attention.head_count")?;
        let kv_heads = self
            .meta_u32(&format!("{arch}.attention.head_count_kv"))?
            .map_or(heads, |v| v as usize);
        let head_dim = self
            .meta_u32(&format!("{arch}.attention.key_length"))?
            .map_or(hidden_size / heads, |v| v as usize);
        let vocab_size = self
            .content
            .tensor_infos
            .get("token_embd.weight")
            .map(|t| t.shape.dims()[0])
            .ok_or_else(|| self.err("tensor token_embd.weight is missing"))?;
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(self.err(format!("{kv_heads} kv heads do not divide {heads} heads")));
        }
        Ok(ModelConfig {
            family,
            vocab_size,
            hidden_size,
            intermediate_size: need("feed_forward_length")?,
            num_hidden_layers: need("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            max_position_embeddings: need("context_length")?,
            rope_theta: self
                .meta_f32(&format!("{arch}.rope.freq_base"))?
                .unwrap_or(10_000.0) as f64,
            rms_norm_eps: self
                .meta_f32(&format!("{arch}.attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-6) as f64,
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            attention_bias: self.content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            qk_norm: false,
            // llama.cpp's converter permutes llama q/k for pairwise RoPE; qwen2 keeps halves.
            rope_interleaved: family == Family::Llama,
            eos_token_ids: self
                .meta_u32("tokenizer.ggml.eos_token_id")?
                .into_iter()
                .collect(),
            diffusion: DiffusionConfig::default(),
        })
    }
}

/// HF checkpoint name → GGUF tensor name (without the `.weight` / `.bias` suffix).
fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens" => return Some("token_embd".into()),
        "model.norm" => return Some("output_norm".into()),
        "lm_head" => return Some("output".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let part = match part {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{part}"))
}

fn mapped(hf: &str) -> candle_core::Result<String> {
    gguf_name(hf).ok_or_else(|| candle_core::Error::Msg(format!("no GGUF name for {hf}")))
}

impl WeightSource for GgufFile {
    fn linear(
        &self,
        name: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> candle_core::Result<Proj> {
        let base = mapped(name)?;
        let q = self.qtensor(&format!("{base}.weight"))?;
        if q.shape().dims() != [out_dim, in_dim] {
            candle_core::bail!(
                "shape mismatch for {base}.weight, expected: [{out_dim}, {in_dim}], got: {:?}",
                q.shape().dims()
            );
        }
        let bias = match bias {
            true => Some(self.dense(&format!("{base}.bias"), &[out_dim])?),
            false => None,
        };
        Proj::quantized(q, bias)
    }

    fn rms_norm(&self, name: &str, size: usize, eps: f64) -> candle_core::Result<RmsNorm> {
        Ok(RmsNorm::new(
            self.dense(&format!("{}.weight", mapped(name)?), &[size])?,
            eps,
        ))
    }

    fn embedding(&self, name: &str, vocab: usize, hidden: usize) -> candle_core::Result<Tensor> {
        self.dense(&format!("{}.weight", mapped(name)?), &[vocab, hidden])
    }

    fn tied_head(
        &self,
        embedding_name: &str,
        vocab: usize,
        hidden: usize,
    ) -> candle_core::Result<Proj> {
        self.linear(embedding_name, hidden, vocab, false)
    }
}

/// Loads the model of a GGUF file.
pub(crate) fn load_gguf_model(file: &GgufFile) -> Result<Model> {
    let config = file.config()?;
    Model::from_source(&config, file, &file.device).map_err(|e| match e {
        EngineError::Candle(c) => file.err(c),
        other => other,
    })
}
