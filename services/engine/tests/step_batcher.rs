//! The step batcher against unbatched decoding on the shipped model: 16 sequences of different
//! prompt lengths, block sizes and modes (autoregressive and diffusion in one batch) give the
//! completions each gives alone, greedy, token for token; with a cache too small for all of them
//! at once, preempted sequences resume and still give the same completions.

mod common;

use common::mixed::{alone, batched, requests, shipped_model};
use sdlm_engine::kv::PagePool;
use sdlm_engine::Device;

#[test]
fn sixteen_mixed_sequences_batched_equal_each_decoded_alone() {
    let (model, tokenizer) = shipped_model(&Device::Cpu);
    batched_equal_alone(&model, &tokenizer);
}

/// The 16 mixed requests batched, with room for all of them at once, against each alone.
fn batched_equal_alone(model: &sdlm_engine::Model, tokenizer: &tokenizers::Tokenizer) {
    let reqs = requests(model, tokenizer);
    let want = alone(model, &reqs);
    let (got, preemptions) = batched(model, &reqs, PagePool::new(1024, 16));
    assert_eq!(preemptions, 0);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "request {i} ({:?})", reqs[i].1.mode);
    }
}

/// The first test with bf16 products on a CPU with AMX (what `sdlm bench --matmul-precision bf16`
/// runs): the batch's rows go through the AMX tiles in parts of the batch, each sequence alone
/// through the same tiles in its own forwards.
#[test]
fn sixteen_mixed_sequences_batched_equal_each_decoded_alone_in_bf16() {
    let (mut model, tokenizer) = shipped_model(&Device::Cpu);
    if let Err(e) = model.set_matmul_precision(sdlm_engine::MatmulPrecision::Bf16) {
        eprintln!("skipped: {e}");
        return;
    }
    batched_equal_alone(&model, &tokenizer);
}

#[test]
fn preempted_sequences_resume_and_give_the_same_completions() {
    let (model, tokenizer) = shipped_model(&Device::Cpu);
    let reqs = requests(&model, &tokenizer);
    let want = alone(&model, &reqs);
    // Room for a few sequences at a time: admission queues the rest, commits run out of pages.
    let (got, preemptions) = batched(&model, &reqs, PagePool::new(24, 4));
    eprintln!("{preemptions} preemptions");
    assert!(
        preemptions > 0,
        "the small cache should have forced preemption"
    );
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "request {i}");
    }
}
