//! The shipped model and a mixed set of requests for the step batcher's tests (CPU and GPU).

use std::collections::HashMap;
use std::path::PathBuf;

use sdlm_engine::decode::{decoder_for, DecodingParams, Mode, StepBatcher};
use sdlm_engine::kv::PagePool;
use sdlm_engine::{open_model_in, ComputeDtype, Device, Model};

/// The shipped model on `device`: `SDLM_TINY_MODEL` when set (gpu-check.sh sets it: the GPU
/// test runs from the bundle), else the checkout's.
pub fn shipped_model(device: &Device) -> (Model, tokenizers::Tokenizer) {
    shipped_model_in(device, ComputeDtype::F32)
}

/// [`shipped_model`] computing in `dtype`.
pub fn shipped_model_in(device: &Device, dtype: ComputeDtype) -> (Model, tokenizers::Tokenizer) {
    let dir = std::env::var_os("SDLM_TINY_MODEL").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/sdlm-tiny-code"),
        PathBuf::from,
    );
    open_model_in(&dir, device, dtype).expect("the shipped model")
}

/// 16 requests: code prompts of different lengths, each with its own block size and mode.
pub fn requests(
    model: &Model,
    tokenizer: &tokenizers::Tokenizer,
) -> Vec<(Vec<u32>, DecodingParams)> {
    let stems = [
        "def add(a, b):\n",
        "import os\n\ndef list_files(path):\n    \"\"\"Return the files under path.\"\"\"\n",
        "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
        "for i in range(10):\n",
    ];
    let blocks = [1, 4, 8, 32];
    (0..16)
        .map(|i| {
            let prompt = tokenizer
                .encode(stems[i % 4], false)
                .unwrap()
                .get_ids()
                .to_vec();
            let mode = if i % 5 == 0 {
                Mode::Autoregressive
            } else {
                Mode::Diffusion
            };
            let params = DecodingParams {
                mode,
                block_size: blocks[(i / 4 + i) % 4],
                max_new_tokens: 12 + (i % 3) * 10,
                ..DecodingParams::for_model(model.config())
            };
            (prompt, params)
        })
        .collect()
}

pub fn alone(model: &Model, reqs: &[(Vec<u32>, DecodingParams)]) -> Vec<Vec<u32>> {
    reqs.iter()
        .map(|(prompt, params)| {
            let mut d = decoder_for(model, prompt, params).unwrap();
            while d.finished().is_none() {
                d.step().unwrap();
            }
            d.completion().to_vec()
        })
        .collect()
}

/// Runs every request through the batcher to the end; completions in request order, and how
/// many times sequences were preempted.
pub fn batched(
    model: &Model,
    reqs: &[(Vec<u32>, DecodingParams)],
    pool: PagePool,
) -> (Vec<Vec<u32>>, usize) {
    let mut batcher = StepBatcher::new(model, pool).unwrap();
    let ids: Vec<u64> = reqs
        .iter()
        .map(|(p, params)| batcher.add(p.clone(), params.clone()))
        .collect();
    let mut out: HashMap<u64, Vec<u32>> = HashMap::new();
    let mut preemptions = 0;
    let mut iterations = 0;
    while !batcher.is_empty() {
        iterations += 1;
        assert!(iterations < 10_000, "the batcher stopped making progress");
        for o in batcher.step() {
            assert!(o.error.is_none(), "sequence {}: {:?}", o.id, o.error);
            out.entry(o.id).or_default().extend(o.tokens);
            preemptions += o.preempted as usize;
        }
    }
    let completions = ids
        .iter()
        .map(|id| out.remove(id).unwrap_or_default())
        .collect();
    (completions, preemptions)
}
