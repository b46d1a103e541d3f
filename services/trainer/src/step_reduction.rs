//! On-policy step reduction (ALGORITHMS.md, "On-policy step reduction"; stage 3). The model in
//! training continues prefixes of training windows greedily, one token per forward (its most
//! careful mode), and the run then trains on those continuations with mask-only corruption.
//! Trained on what it would write anyway, the model grows sure of it; a denoising step commits
//! every position whose confidence reaches the threshold, so surer means more tokens per
//! forward. Each round's continuations are written once (`step-reduction-ROUND.bin` in the run
//! directory), so a resumed run trains on the same ones.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sdlm_engine::decode::{DecodingParams, Mode, StepBatcher};
use sdlm_engine::kv::PagePool;
use sdlm_engine::{Model, ModelConfig};

use crate::data::TokenShard;
use crate::error::TrainerError;
use crate::learner::Learner;
use crate::rng::TrainRng;
use crate::shards::Document;

/// Sequences decoded at once (the step batcher's concurrency): enough rows per forward to keep
/// the few-row matmul busy on a small model.
const CONCURRENCY: usize = 32;
const PAGE_TOKENS: usize = 16;

/// Prefixes of `seq_len / 8 ..= seq_len / 2` tokens drawn from `shard` at `rng`'s positions,
/// each long enough to hold a window.
pub fn draw_prefixes(
    shard: &TokenShard,
    seq_len: usize,
    count: usize,
    rng: &mut TrainRng,
) -> Vec<Vec<u32>> {
    let (shortest, longest) = ((seq_len / 8).max(1), (seq_len / 2).max(1));
    let starts = shard.len().saturating_sub(seq_len) + 1;
    (0..count)
        .map(|_| {
            let start = rng.below(starts);
            let len = shortest + rng.below(longest - shortest + 1);
            shard.slice(start, len)
        })
        .collect()
}

/// Each prefix followed by the model's greedy continuation to exactly `seq_len` tokens. The
/// end-of-text token does not stop it: in the training data a new file follows it, and a window
/// whose every token is the model's own is what stage 3 trains on.
pub fn continue_greedily(
    learner: &Learner,
    config: &ModelConfig,
    prefixes: &[Vec<u32>],
    seq_len: usize,
) -> Result<Vec<Document>, TrainerError> {
    let mut config = config.clone();
    config.eos_token_ids.clear();
    let model = detached_copy(learner, &config)?;
    let pages = CONCURRENCY * (seq_len.div_ceil(PAGE_TOKENS) + 2);
    let mut batcher = StepBatcher::new(&model, PagePool::new(pages, PAGE_TOKENS))?;
    let mut docs: HashMap<u64, Document> = HashMap::new();
    let mut order = Vec::with_capacity(prefixes.len());
    let mut next = 0;
    while next < prefixes.len() || !batcher.is_empty() {
        while batcher.len() < CONCURRENCY && next < prefixes.len() {
            let prefix = &prefixes[next];
            let params = DecodingParams {
                mode: Mode::Autoregressive,
                block_size: 1,
                max_new_tokens: seq_len.saturating_sub(prefix.len()).max(1),
                ..DecodingParams::default()
            };
            let id = batcher.add(prefix.clone(), params);
            docs.insert(id, prefix.clone());
            order.push(id);
            next += 1;
        }
        for out in batcher.step() {
            if let Some(e) = out.error {
                return Err(e.into());
            }
            if let Some(doc) = docs.get_mut(&out.id) {
                doc.extend(&out.tokens);
            }
        }
    }
    Ok(order.iter().filter_map(|id| docs.remove(id)).collect())
}

/// The learner's model over copies of its weights, detached from the gradient graph, so that
/// decoding runs the serving path (no graph, the few-row matmuls).
fn detached_copy(learner: &Learner, config: &ModelConfig) -> Result<Model, TrainerError> {
    let weights: HashMap<String, Tensor> = learner
        .varmap
        .data()
        .lock()
        .map_err(|_| TrainerError::Input("the weights' lock is poisoned".into()))?
        .iter()
        .map(|(name, var)| Ok((name.clone(), var.as_tensor().detach().copy()?)))
        .collect::<Result<_, candle_core::Error>>()?;
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    Ok(Model::new(config, vb)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shards::write_tokens;

    #[test]
    fn prefixes_are_slices_of_the_shard_of_an_eighth_to_half_a_window() {
        let path = std::env::temp_dir().join(format!("sdlm-sr-prefix-{}.bin", std::process::id()));
        let tokens: Vec<u32> = (0..1000).collect();
        write_tokens(&path, &tokens, 1000, 1, 0).unwrap();
        let shard = TokenShard::open(&path).unwrap();
        let prefixes = draw_prefixes(&shard, 64, 500, &mut TrainRng::new(9));
        assert_eq!(prefixes.len(), 500);
        for p in &prefixes {
            assert!(
                (8..=32).contains(&p.len()),
                "a prefix of {} tokens",
                p.len()
            );
            // Consecutive ids: a slice of the shard, with room for a whole window after its start.
            assert!(p.windows(2).all(|w| w[1] == w[0] + 1));
            assert!(p[0] as usize + 64 <= 1000);
        }
        let lengths: std::collections::HashSet<usize> = prefixes.iter().map(Vec::len).collect();
        assert_eq!(lengths.len(), 25, "every length from 8 to 32 drawn");
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(path.with_extension("json"));
    }
}
