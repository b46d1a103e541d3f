//! The model computed in bf16 or f16 (what `--dtype` asks for on a GPU) through candle's generic
//! ops, run here on the CPU: the same logits as in f32 to the precision of the narrower type, for
//! a whole-sequence forward and for forwards over the KV cache (the decoders' path).

mod common;

use common::{fixture, logits, rel_err};
use sdlm_engine::{load_model, DType, Device, KvCache, MaskRule, Model};

fn load(name: &str, dtype: DType) -> Model {
    load_model(&fixture(name), &Device::Cpu, dtype).expect("fixture loads")
}

/// Eight machine epsilons of the narrow type: a few roundings a layer over the fixtures' two
/// layers land within that, while a wrong mask, rotation or cache gives errors of order one.
fn tolerance(dtype: DType) -> f32 {
    8.0 * match dtype {
        DType::BF16 => f32::from(half::bf16::EPSILON),
        DType::F16 => f32::from(half::f16::EPSILON),
        _ => f32::EPSILON,
    }
}

fn check(name: &str, dtype: DType) {
    let tolerance = tolerance(dtype);
    let (narrow, wide) = (load(name, dtype), load(name, DType::F32));
    let ids: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 100).collect();
    for rule in [
        MaskRule::Causal,
        MaskRule::BlockCausal {
            prefix: 8,
            block: 4,
        },
    ] {
        let err = rel_err(&logits(&narrow, &ids, rule), &logits(&wide, &ids, rule));
        eprintln!("{name} {dtype:?} {rule:?}: relative error {err:e}");
        assert!(
            err <= tolerance,
            "{name} {dtype:?} {rule:?}: relative error {err}"
        );
    }
    // The cache: a prompt, then a block of 4 over it, as a diffusion decoder runs them.
    let run = |model: &Model| {
        let mut cache = KvCache::new();
        model
            .forward_cached(&ids[..16], &mut cache, 1, true)
            .unwrap();
        model
            .forward_cached(&ids[16..20], &mut cache, 4, false)
            .unwrap()
    };
    let err = rel_err(&run(&narrow), &run(&wide));
    eprintln!("{name} {dtype:?} cached block: relative error {err:e}");
    assert!(
        err <= tolerance,
        "{name} {dtype:?} cached block: relative error {err}"
    );
}

#[test]
fn qwen2_in_bf16_gives_the_f32_logits_to_bf16_precision() {
    check("qwen2-tied-bf16", DType::BF16);
}

#[test]
fn qwen3_in_f16_gives_the_f32_logits_to_f16_precision() {
    check("qwen3-headdim-f16", DType::F16);
}
