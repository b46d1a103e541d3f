//! The differentiable forward (for training): the same logits as the serving forward, and
//! gradients that reach every weight.

mod common;

use common::{expected, fixture, fixture_rule, inputs, max_abs_diff};
use sdlm_engine::{load_model, open_model, DType, Device, MaskRule, Model, ModelConfig, Tensor};

fn both(model: &Model, ids: &[u32], rule: MaskRule) -> (Tensor, Tensor) {
    let (input, positions, mask) = inputs(ids, rule);
    (
        model.forward(&input, &positions, &mask).unwrap(),
        model.forward_train(&input, &positions, &mask).unwrap(),
    )
}

#[test]
fn differentiable_forward_equals_the_fast_one() {
    for name in ["qwen3-headdim-f16", "llama-sharded-f32"] {
        let model = load_model(&fixture(name), &Device::Cpu, DType::F32).unwrap();
        let (ids, want) = expected(&format!("{name}/expected.safetensors"));
        let (fast, diff) = both(&model, &ids, fixture_rule(&want));
        let d = max_abs_diff(&fast, &diff);
        assert!(d <= 1e-4, "{name}: {d}");
    }
    // Pairwise RoPE (GGUF llama layout) too.
    let (model, _) = open_model(&fixture("gguf/llama-f32.gguf"), &Device::Cpu).unwrap();
    let (ids, _) = expected("gguf/llama-f32.expected.safetensors");
    let (fast, diff) = both(&model, &ids, MaskRule::Causal);
    assert!(max_abs_diff(&fast, &diff) <= 1e-4);
}

#[test]
fn gradients_reach_every_weight() {
    let config = ModelConfig::from_dir(&fixture("qwen3-headdim-f16")).unwrap();
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = Model::new(&config, vb).unwrap();
    let ids: Vec<u32> = (0..12u32).map(|i| (i * 29 + 5) % 128).collect();
    let targets: Vec<u32> = (0..12u32).map(|i| (i * 53 + 1) % 128).collect();
    let (input, positions, mask) = inputs(
        &ids,
        MaskRule::BlockCausal {
            prefix: 3,
            block: 4,
        },
    );
    let logits = model
        .forward_train(&input, &positions, &mask)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let target = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
    let loss = candle_nn::loss::cross_entropy(&logits, &target).unwrap();
    let grads = loss.backward().unwrap();
    let vars = varmap.all_vars();
    assert!(vars.len() > 10, "{} variables", vars.len());
    for var in vars {
        let g = grads
            .get(&var)
            .unwrap_or_else(|| panic!("no gradient for a {:?} weight", var.dims()));
        let norm: f32 = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(
            norm.is_finite() && norm > 0.0,
            "gradient norm {norm} for a {:?} weight",
            var.dims()
        );
    }
}
