//! The model being trained: its variables, the engine's model over them (one model definition
//! for training and serving), and the optimiser step over accumulated micro-batches.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use sdlm_engine::{Model, ModelConfig};

use crate::error::TrainerError;
use crate::objective::{loss, Batch};
use crate::optim::{clip_global_norm, AdamW, AdamWConfig};
use crate::rng::TrainRng;
use crate::settings::Settings;

/// Standard deviation of the initial weights (GPT-2's choice); the output projections of each
/// residual branch are scaled by 1/√(2·layers) so the residual stream starts at unit scale.
const INIT_STD: f64 = 0.02;

/// The HF `config.json` of a model trained with `settings` over a tokenizer with `mask_id`.
pub fn hf_config(settings: &Settings, mask_id: u32, eos_id: u32, pad_id: u32) -> serde_json::Value {
    let a = &settings.architecture;
    serde_json::json!({
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": settings.vocab_size,
        "hidden_size": a.hidden_size,
        "intermediate_size": a.intermediate_size,
        "num_hidden_layers": a.num_hidden_layers,
        "num_attention_heads": a.num_attention_heads,
        "num_key_value_heads": a.num_key_value_heads,
        "head_dim": a.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": settings.seq_len.max(2048),
        "rope_theta": a.rope_theta,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": true,
        "attention_bias": false,
        "attention_dropout": 0.0,
        "use_sliding_window": false,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
        "block_size": settings.serve_block_size,
        "mask_token_id": mask_id,
        "logits_shift": false,
    })
}

pub struct Learner {
    pub varmap: VarMap,
    pub model: Model,
    pub optimizer: AdamW,
    pub mask_id: u32,
    grad_clip: f64,
}

/// What one optimiser step measured.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct StepStats {
    pub loss: f64,
    pub mask_loss: f64,
    pub edit_loss: f64,
    pub grad_norm: f64,
    pub edits: usize,
    pub levenshtein: usize,
}

impl Learner {
    /// A freshly initialised model for `config` (weights drawn from `seed`).
    pub fn new(
        config: &ModelConfig,
        settings: &Settings,
        mask_id: u32,
        seed: u64,
    ) -> Result<Self, TrainerError> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let model = Model::new(config, vb)?;
        initialise(&varmap, config.num_hidden_layers, seed)?;
        let optimizer = AdamW::new(
            &varmap,
            AdamWConfig {
                weight_decay: settings.weight_decay,
                ..AdamWConfig::default()
            },
        )?;
        Ok(Self {
            varmap,
            model,
            optimizer,
            mask_id,
            grad_clip: settings.grad_clip,
        })
    }

    /// One optimiser step: the gradient of the mean loss over `micro_batches`, clipped, at `lr`.
    pub fn step(&mut self, micro_batches: &[Batch], lr: f64) -> Result<StepStats, TrainerError> {
        let n = micro_batches.len() as f64;
        let mut sum: Option<Vec<Tensor>> = None;
        let mut stats = StepStats {
            loss: 0.0,
            mask_loss: 0.0,
            edit_loss: 0.0,
            grad_norm: 0.0,
            edits: 0,
            levenshtein: 0,
        };
        for batch in micro_batches {
            let l = loss(&self.model, batch, self.mask_id)?;
            let grads = self.optimizer.gradients(&l.total.backward()?)?;
            sum = Some(match sum {
                None => grads,
                Some(acc) => acc
                    .iter()
                    .zip(&grads)
                    .map(|(a, g)| a + g)
                    .collect::<Result<_, _>>()?,
            });
            stats.loss += l.total.to_scalar::<f32>()? as f64 / n;
            stats.mask_loss += l.mask / n;
            stats.edit_loss += l.edit / n;
            stats.edits += batch.edits;
            stats.levenshtein += batch.levenshtein;
        }
        let mut grads: Vec<Tensor> = sum
            .ok_or_else(|| TrainerError::Input("a step needs at least one micro-batch".into()))?
            .iter()
            .map(|g| g / n)
            .collect::<Result<_, _>>()?;
        stats.grad_norm = clip_global_norm(&mut grads, self.grad_clip)?;
        if !stats.loss.is_finite() || !stats.grad_norm.is_finite() {
            return Err(TrainerError::Diverged {
                loss: stats.loss,
                grad_norm: stats.grad_norm,
            });
        }
        self.optimizer.step(&grads, lr)?;
        Ok(stats)
    }
}

/// Draws every weight from N(0, INIT_STD) with our generator (norm gains stay 1), variables in
/// name order so a seed always gives the same model.
fn initialise(varmap: &VarMap, layers: usize, seed: u64) -> Result<(), TrainerError> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| TrainerError::Input("the variable map's lock is poisoned".into()))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = TrainRng::new(seed);
    for name in names {
        let var = &data[name];
        if name.contains("norm") {
            continue;
        }
        let std = if name.contains("o_proj") || name.contains("down_proj") {
            INIT_STD / (2.0 * layers as f64).sqrt()
        } else {
            INIT_STD
        };
        let values: Vec<f32> = (0..var.elem_count())
            .map(|_| (rng.normal() * std) as f32)
            .collect();
        var.set(&Tensor::from_vec(values, var.dims(), var.device())?)?;
    }
    Ok(())
}
