//! The step batcher's scheduling policies on the shipped model: a long prompt is prefilled in
//! chunks within the per-iteration token budget while other sequences keep decoding; a prompt
//! that shares a prefix with an earlier one reuses its cached pages; when pages run out, the
//! newest sequences are preempted. Each also checks the completions equal unbatched decoding.

use std::collections::HashMap;
use std::path::PathBuf;

use sdlm_engine::decode::{decoder_for, DecodingParams, Mode, StepBatcher, StepOutput};
use sdlm_engine::kv::PagePool;
use sdlm_engine::{open_model, Device, Model};

fn shipped_model() -> (Model, tokenizers::Tokenizer) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/sdlm-tiny-code");
    open_model(&dir, &Device::Cpu).unwrap()
}

fn encode(tokenizer: &tokenizers::Tokenizer, text: &str) -> Vec<u32> {
    tokenizer.encode(text, false).unwrap().get_ids().to_vec()
}

/// A prompt of a few hundred tokens: a module's worth of small functions.
fn long_prompt(tokenizer: &tokenizers::Tokenizer) -> Vec<u32> {
    let text: String = (0..12)
        .map(|i| format!("def f{i}(x, y):\n    \"\"\"Return x plus {i} times y.\"\"\"\n    return x + {i} * y\n\n"))
        .collect();
    encode(tokenizer, &text)
}

fn alone(model: &Model, prompt: &[u32], params: &DecodingParams) -> Vec<u32> {
    let mut d = decoder_for(model, prompt, params).unwrap();
    while d.finished().is_none() {
        d.step().unwrap();
    }
    d.completion().to_vec()
}

/// Steps the batcher until it is empty; every iteration's outputs, in order.
fn run_to_end(batcher: &mut StepBatcher<'_>) -> Vec<Vec<StepOutput>> {
    let mut iterations = Vec::new();
    while !batcher.is_empty() {
        assert!(
            iterations.len() < 10_000,
            "the batcher stopped making progress"
        );
        let outs = batcher.step();
        for o in &outs {
            assert!(o.error.is_none(), "sequence {}: {:?}", o.id, o.error);
        }
        iterations.push(outs);
    }
    iterations
}

fn completions(iterations: &[Vec<StepOutput>]) -> HashMap<u64, Vec<u32>> {
    let mut out: HashMap<u64, Vec<u32>> = HashMap::new();
    for o in iterations.iter().flatten() {
        out.entry(o.id).or_default().extend(&o.tokens);
    }
    out
}

#[test]
fn a_long_prompt_is_prefilled_in_chunks_while_the_others_keep_decoding() {
    let (model, tokenizer) = shipped_model();
    let ar = DecodingParams {
        mode: Mode::Autoregressive,
        max_new_tokens: 40,
        ..DecodingParams::for_model(model.config())
    };
    let short = encode(&tokenizer, "def add(a, b):\n");
    let long = long_prompt(&tokenizer);
    let budget = 64;
    assert!(
        long.len() > 4 * budget,
        "the prompt has {} tokens",
        long.len()
    );
    let mut batcher = StepBatcher::new(&model, PagePool::new(256, 16))
        .unwrap()
        .with_max_batch_tokens(budget);
    let (a, b) = (
        batcher.add(short.clone(), ar.clone()),
        batcher.add(short.clone(), ar.clone()),
    );
    // Let both start decoding, then the long prompt arrives.
    let mut iterations = vec![batcher.step(), batcher.step()];
    let late = batcher.add(long.clone(), ar.clone());
    let started = iterations.len();
    iterations.extend(run_to_end(&mut batcher));
    let prefilling: Vec<&Vec<StepOutput>> = iterations[started..]
        .iter()
        .take_while(|outs| {
            !outs
                .iter()
                .any(|o| o.id == late && o.stats.prefill_forwards > 0 && o.stats.steps > 0)
        })
        .collect();
    let chunks = iterations
        .iter()
        .flatten()
        .filter(|o| o.id == late)
        .map(|o| o.stats.prefill_forwards)
        .max()
        .unwrap_or(0);
    assert!(
        chunks >= long.len() / budget,
        "{} prompt tokens in budgets of {budget} took {chunks} prefill forwards",
        long.len()
    );
    // While the long prompt was being prefilled, both short sequences committed a token at
    // every iteration (AR: one per step).
    assert!(
        prefilling.len() >= 4,
        "{} iterations of prefill",
        prefilling.len()
    );
    for outs in prefilling.iter().take(4) {
        for id in [a, b] {
            let o = outs
                .iter()
                .find(|o| o.id == id)
                .expect("the short sequence stepped");
            assert_eq!(
                o.tokens.len(),
                1,
                "sequence {id} stalled during the prefill"
            );
        }
    }
    let got = completions(&iterations);
    let want_short = alone(&model, &short, &ar);
    assert_eq!(
        got[&late],
        alone(&model, &long, &ar),
        "the chunked prompt's completion"
    );
    assert_eq!(got[&a], want_short);
    assert_eq!(got[&b], want_short);
}

#[test]
fn a_prompt_sharing_a_prefix_reuses_the_cached_pages() {
    let (model, tokenizer) = shipped_model();
    let params = DecodingParams {
        max_new_tokens: 24,
        ..DecodingParams::for_model(model.config())
    };
    let first = long_prompt(&tokenizer);
    let mut second = first.clone();
    second.extend(encode(&tokenizer, "def g(z):\n"));
    let pool = PagePool::new(256, 16);
    let mut batcher = StepBatcher::new(&model, pool.clone()).unwrap();
    let a = batcher.add(first.clone(), params.clone());
    let got_a = completions(&run_to_end(&mut batcher));
    let hits_before = pool.prefix_stats().hits;
    let b = batcher.add(second.clone(), params.clone());
    let iterations = run_to_end(&mut batcher);
    let reused = iterations
        .iter()
        .flatten()
        .filter(|o| o.id == b)
        .map(|o| o.stats.cached_prompt_tokens)
        .max()
        .unwrap_or(0);
    // Every full page of the first prompt is shared (the second continues past it).
    let shared_pages = first.len() / 16;
    assert_eq!(reused, shared_pages * 16);
    assert_eq!(pool.prefix_stats().hits - hits_before, shared_pages as u64);
    assert_eq!(got_a[&a], alone(&model, &first, &params));
    assert_eq!(
        completions(&iterations)[&b],
        alone(&model, &second, &params)
    );
    pool.check().unwrap();
}

#[test]
fn when_pages_run_out_the_newest_sequences_are_preempted() {
    let (model, tokenizer) = shipped_model();
    let params = DecodingParams {
        mode: Mode::Diffusion,
        block_size: 8,
        max_new_tokens: 48,
        ..DecodingParams::for_model(model.config())
    };
    let prompts: Vec<Vec<u32>> = [
        "def add(a, b):\n",
        "for i in range(10):\n",
        "class Stack:\n",
        "import os\n",
    ]
    .iter()
    .map(|t| encode(&tokenizer, t))
    .collect();
    // Room to admit all four, not to let all four grow to the end: 28 pages of 4 tokens hold
    // the prompts (3–8 tokens) with a block each, while four 48-token completions need 54 pages.
    // (40 pages sufficed while the model committed one token per step; with two, the first
    // sequences finish and free their pages before the last ones need them.)
    let mut batcher = StepBatcher::new(&model, PagePool::new(28, 4)).unwrap();
    let ids: Vec<u64> = prompts
        .iter()
        .map(|p| batcher.add(p.clone(), params.clone()))
        .collect();
    let iterations = run_to_end(&mut batcher);
    let mut preemptions = 0;
    for outs in &iterations {
        let preempted: Vec<u64> = outs.iter().filter(|o| o.preempted).map(|o| o.id).collect();
        let advanced = outs.iter().filter(|o| !o.preempted && !o.tokens.is_empty());
        for o in advanced {
            for &p in &preempted {
                assert!(
                    p > o.id,
                    "sequence {p} was preempted while the newer {} ran",
                    o.id
                );
            }
        }
        preemptions += preempted.len();
    }
    assert!(
        preemptions > 0,
        "the small cache should have forced preemption"
    );
    let got = completions(&iterations);
    for (id, prompt) in ids.iter().zip(&prompts) {
        assert_eq!(got[id], alone(&model, prompt, &params), "sequence {id}");
    }
}
