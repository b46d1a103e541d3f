//! The engine's CUDA path against its CPU path: the decoders' greedy choice made on the device
//! (the kernels' `row_confidence` on candle's tensors, on candle's stream) against the CPU
//! sampler on the same logits, and the step batcher with its pages on the GPU (the kernels'
//! paged attention and KV scatter) against decoding alone on the CPU. Needs a GPU: built with
//! `--features cuda` by kernels/build-gpu-bundle.sh, run by kernels/gpu-check.sh.
#![cfg(feature = "cuda")]

mod common;

use common::mixed::{alone, batched, requests, shipped_model, shipped_model_in};
use common::paged_script::alone_and_paged;
use common::rel_err;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sdlm_engine::decode::{DecodingParams, Sampler};
use sdlm_engine::kv::{KvStorage, PagePool};
use sdlm_engine::{greedy_choices_on_device, ComputeDtype, Device, Model, Tensor};

#[test]
fn device_choices_equal_the_cpu_sampler_with_the_banned_token_left_out() {
    let seed: u64 = rand::rng().random();
    println!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    // Vocabularies: the shipped model's, Qwen's, and two that are not a multiple of the
    // kernel's 16-byte vectors.
    for (rows, vocab) in [(1, 8192), (7, 1000), (33, 151_936), (5, 9001)] {
        let mut values: Vec<f32> = (0..rows * vocab)
            .map(|_| rng.random_range(-8.0..8.0))
            .collect();
        // The banned token is every row's largest logit, so leaving it out changes the answer.
        let banned = rng.random_range(0..vocab);
        for r in 0..rows {
            values[r * vocab + banned] = 100.0;
        }
        let on_gpu = Tensor::from_vec(values.clone(), (rows, vocab), &Device::Cpu)
            .and_then(|t| t.to_device(&gpu))
            .expect("logits on the GPU");
        // The whole tensor, and a view that starts one row into its buffer.
        let views = [
            (0, on_gpu.clone()),
            (1, on_gpu.narrow(0, 1, rows - 1).unwrap()),
        ];
        for (first, logits) in views {
            for ban in [Some(banned as u32), None] {
                let got = greedy_choices_on_device(&logits, ban).expect("device choices");
                assert_eq!(got.len(), rows - first);
                let mut sampler = Sampler::new(&DecodingParams::default());
                for (i, g) in got.iter().enumerate() {
                    let row = &values[(first + i) * vocab..(first + i + 1) * vocab];
                    let want = sampler.pick(row, ban);
                    assert_eq!(
                        g.token, want.token,
                        "row {i} of {rows} x {vocab}, ban {ban:?}"
                    );
                    let rel = ((g.confidence - want.confidence) / want.confidence).abs();
                    assert!(
                        rel <= 1e-5,
                        "row {i} of {rows} x {vocab}: confidence {} vs {} ({rel:e})",
                        g.confidence,
                        want.confidence
                    );
                }
            }
        }
    }
}

#[test]
fn the_step_batcher_on_the_gpu_gives_each_sequence_what_the_cpu_gives_it_alone() {
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    let (cpu_model, tokenizer) = shipped_model(&Device::Cpu);
    let (gpu_model, _) = shipped_model(&gpu);
    let reqs = requests(&cpu_model, &tokenizer);
    let alone = alone(&cpu_model, &reqs);
    // Pages of 16 with room for all, and pages of 4 with room for a few (preemption).
    for pool in [PagePool::new(1024, 16), PagePool::new(24, 4)] {
        let (got, _) = batched(&gpu_model, &reqs, pool);
        for (i, (g, w)) in got.iter().zip(&alone).enumerate() {
            assert_eq!(g, w, "request {i} ({:?})", reqs[i].1.mode);
        }
    }
}

#[test]
fn the_paged_forward_on_the_gpu_gives_each_sequence_its_logits_alone_in_f32_and_bf16() {
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    // f32: the paged kernel and candle's dense attention sum in other orders. bf16: each path
    // rounds its own activations (and the pages hold bf16, taking the tensor-core kernel):
    // eight machine epsilons, as tests/half_precision.rs allows against f32.
    for (dtype, tolerance) in [
        (ComputeDtype::F32, 1e-4),
        (ComputeDtype::Bf16, 8.0 * f32::from(half::bf16::EPSILON)),
    ] {
        let (model, _) = shipped_model_in(&gpu, dtype);
        let device_pages = |m: &Model, pool: &PagePool| {
            KvStorage::on(
                m.device(),
                m.dtype(),
                m.config().num_hidden_layers,
                pool.total(),
                m.attention_shape(4),
            )
            .unwrap()
        };
        for (s, steps) in alone_and_paged(&model, device_pages).iter().enumerate() {
            for (step, (alone, paged)) in steps.iter().enumerate() {
                let err = rel_err(paged, alone);
                eprintln!("{dtype} sequence {s}, step {step}: relative error {err:e}");
                assert!(err <= tolerance, "{dtype} sequence {s}, step {step}: {err}");
            }
        }
    }
}
