//! GGUF loading against transformers: tests/fixtures/make_gguf_fixtures.py writes two fixtures
//! the way llama.cpp's converter does (llama in f32 with q/k permuted for pairwise RoPE; qwen2
//! with bias and tied embeddings in Q8_0) plus transformers' logits for the weights each file
//! holds; the tokenizer comes from the file's tokenizer.ggml.* metadata.

mod common;

use common::{expected, fixture, fixture_rule, logits, max_abs_diff};
use sdlm_engine::{open_model, Device, KvCache, MaskRule, Tensor};

#[test]
fn llama_f32_gguf_with_permuted_qk_matches_transformers() {
    let (model, _) = open_model(&fixture("gguf/llama-f32.gguf"), &Device::Cpu).unwrap();
    assert!(model.config().rope_interleaved);
    let (ids, want) = expected("gguf/llama-f32.expected.safetensors");
    let diff = max_abs_diff(
        &logits(&model, &ids, MaskRule::Causal),
        &want["causal_logits"],
    );
    eprintln!("llama f32 gguf causal: max |Δlogit| = {diff:e}");
    assert!(diff <= 1e-4, "causal: {diff}");
    let rule = fixture_rule(&want);
    let diff = max_abs_diff(&logits(&model, &ids, rule), &want["block_causal_logits"]);
    assert!(diff <= 1e-4, "block-causal: {diff}");
}

#[test]
fn qwen2_q8_0_gguf_matches_transformers_with_llama_cpps_activation_rounding() {
    let (model, _) = open_model(&fixture("gguf/qwen2-q8_0.gguf"), &Device::Cpu).unwrap();
    let c = model.config();
    assert!(c.attention_bias && c.tie_word_embeddings && !c.rope_interleaved);
    let (ids, want) = expected("gguf/qwen2-q8_0.expected.safetensors");
    // The reference is transformers on the dequantized Q8_0 weights with every projection's
    // input rounded to Q8_0 first, as llama.cpp does, for the first rows of the sequence.
    let want_rounded = want["q8_activation_logits"].to_vec2::<f32>().unwrap();
    let rows = want_rounded.len();
    // Many rows at once (16: the few-row 8-bit path, which rounds the activations as llama.cpp
    // does and multiplies in integers).
    let all = logits(&model, &ids, MaskRule::Causal);
    let diff = max_abs_diff(
        &all.narrow(0, 0, rows).unwrap(),
        &want["q8_activation_logits"],
    );
    eprintln!(
        "qwen2 q8_0 gguf, {} rows at once: max |Δlogit| = {diff:e}",
        ids.len()
    );
    assert!(diff <= 1e-4, "{diff}");
    // Rounding matters: the unrounded reference differs by far more than the tolerance, so the
    // comparison above would notice a path that skipped it.
    let unrounded = max_abs_diff(&all, &want["causal_logits"]);
    eprintln!("against the unrounded reference: max |Δlogit| = {unrounded:e}");
    assert!(unrounded > 1e-3, "{unrounded}");
    // One row at a time (AR decoding over the cache): candle's quantized dot products, which
    // round activations to Q8_0 in the same way.
    let mut cache = KvCache::new();
    for (i, row) in want_rounded.iter().enumerate() {
        let got = model
            .forward_cached(&ids[i..i + 1], &mut cache, 1, true)
            .unwrap();
        let want_row = Tensor::new(row.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let diff = max_abs_diff(&got, &want_row);
        eprintln!("qwen2 q8_0 gguf, token {i} alone: max |Δlogit| = {diff:e}");
        assert!(diff <= 1e-4, "token {i}: {diff}");
    }
}

#[test]
fn gguf_tokenizer_is_byte_level_bpe_from_the_metadata() {
    let (_, tokenizer) = open_model(&fixture("gguf/qwen2-q8_0.gguf"), &Device::Cpu).unwrap();
    let text = "def f(x):\n\treturn x + 1";
    let ids = tokenizer.encode(text, true).unwrap().get_ids().to_vec();
    // The fixture's vocabulary: <unk>, \n, \t, then printable ASCII from the space (id 3) on.
    let want: Vec<u32> = text
        .bytes()
        .map(|b| match b {
            b'\n' => 1,
            b'\t' => 2,
            b => (b - 32) as u32 + 3,
        })
        .collect();
    assert_eq!(ids, want);
    assert_eq!(tokenizer.decode(&ids, false).unwrap(), text);
}

#[test]
fn truncated_gguf_names_the_file() {
    let src = std::fs::read(fixture("gguf/qwen2-q8_0.gguf")).unwrap();
    let path = std::env::temp_dir().join(format!("sdlm-truncated-{}.gguf", std::process::id()));
    std::fs::write(&path, &src[..src.len() - 1000]).unwrap();
    let err = open_model(&path, &Device::Cpu)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains(path.to_str().unwrap()), "{err}");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn q8_0_gguf_with_bf16_matmuls_stays_within_bf16_rounding_and_f32_restores_the_exact_path() {
    if let Err(e) = sdlm_engine::MatmulPrecision::Bf16.check(&Device::Cpu) {
        eprintln!("skipped: {e}");
        return;
    }
    let (mut model, _) = open_model(&fixture("gguf/qwen2-q8_0.gguf"), &Device::Cpu).unwrap();
    let (ids, want) = expected("gguf/qwen2-q8_0.expected.safetensors");
    let exact = logits(&model, &ids, MaskRule::Causal);
    model
        .set_matmul_precision(sdlm_engine::MatmulPrecision::Bf16)
        .unwrap();
    // Packed from the dequantized weights: against transformers on those weights (no
    // activation rounding to Q8_0 now), off by bf16's rounding of weights and inputs, a few
    // thousandths of the logits' size, not by a broken product's whole size.
    let packed = logits(&model, &ids, MaskRule::Causal);
    let scale = max_abs_diff(
        &want["causal_logits"],
        &want["causal_logits"].zeros_like().unwrap(),
    );
    let diff = max_abs_diff(&packed, &want["causal_logits"]);
    eprintln!("qwen2 q8_0 gguf, bf16 matmuls: max |Δlogit| = {diff:e} of {scale:e}");
    assert!(diff > 0.0 && diff <= 0.05 * scale, "{diff} of {scale}");
    // A row alone over the cache gets the numbers it gets among all the rows.
    let mut cache = KvCache::new();
    for i in 0..4 {
        let row = model
            .forward_cached(&ids[i..i + 1], &mut cache, 1, true)
            .unwrap();
        assert_eq!(
            row.to_vec2::<f32>().unwrap()[0],
            packed.narrow(0, i, 1).unwrap().to_vec2::<f32>().unwrap()[0],
            "token {i}"
        );
    }
    model
        .set_matmul_precision(sdlm_engine::MatmulPrecision::F32)
        .unwrap();
    let back = logits(&model, &ids, MaskRule::Causal);
    assert_eq!(max_abs_diff(&back, &exact), 0.0);
}
