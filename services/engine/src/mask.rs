//! The attention mask rules. One rule decides, for a query position and a key position, whether
//! the query sees the key; the dense additive mask for a whole-sequence forward is built from it,
//! and the paged CUDA/CPU kernels implement the same rule for blocks over a cache.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// Which earlier and later positions a token attends to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskRule {
    /// Token i sees tokens 0..=i (autoregressive).
    Causal,
    /// The first `prefix` tokens (the prompt) are causal; after them the sequence is cut into
    /// blocks of `block` tokens, and a token sees every token before its block and every token
    /// of its block (block diffusion).
    BlockCausal { prefix: usize, block: usize },
    /// Every token sees every token.
    Bidirectional,
}

impl MaskRule {
    pub fn allows(&self, query: usize, key: usize) -> bool {
        match *self {
            MaskRule::Causal => key <= query,
            MaskRule::Bidirectional => true,
            MaskRule::BlockCausal { prefix, block } => {
                if query < prefix {
                    key <= query
                } else if key < prefix {
                    true
                } else {
                    let block = block.max(1);
                    (key - prefix) / block <= (query - prefix) / block
                }
            }
        }
    }

    /// `[len, len]` f32 with 0 where the query (row) sees the key (column) and -inf elsewhere.
    pub fn additive(&self, len: usize, device: &Device) -> Result<Tensor> {
        self.additive_rows(0..len, len, device)
    }

    /// The rows `queries` of the `[keys, keys]` additive mask: for new tokens over a cache.
    pub fn additive_rows(
        &self,
        queries: std::ops::Range<usize>,
        keys: usize,
        device: &Device,
    ) -> Result<Tensor> {
        let rows = queries.len();
        let data: Vec<f32> = queries
            .flat_map(|q| (0..keys).map(move |k| (q, k)))
            .map(|(q, k)| {
                if self.allows(q, k) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        Ok(Tensor::from_vec(data, (rows, keys), device)?)
    }
}

/// The `[2L, 2L]` additive mask over a corrupted sequence followed by its clean twin (the
/// vectorised block-diffusion form of ALGORITHMS.md), where `block_ids[p]` is the block of
/// position p (non-decreasing) in both halves: a corrupted token sees its own block of the
/// corrupted half and the clean blocks before it; a clean token sees clean blocks up to and
/// including its own; no clean token sees the corrupted half. Training uses it with random
/// partitions; with one block per position it scores an in-place (logits_shift = false) model
/// autoregressively in one forward. Built by broadcast comparisons of block ids.
pub fn twin_mask(block_ids: &[usize], device: &Device) -> Result<Tensor> {
    let len = block_ids.len();
    let ids: Vec<f32> = block_ids
        .iter()
        .chain(block_ids)
        .map(|&b| b as f32)
        .collect();
    let clean: Vec<f32> = (0..2 * len)
        .map(|i| f32::from(u8::from(i >= len)))
        .collect();
    let q_block = Tensor::from_vec(ids.clone(), (2 * len, 1), device)?;
    let k_block = Tensor::from_vec(ids, (1, 2 * len), device)?;
    let q_clean = Tensor::from_vec(clean.clone(), (2 * len, 1), device)?;
    let k_clean = Tensor::from_vec(clean, (1, 2 * len), device)?;
    let q_corrupt = q_clean.affine(-1.0, 1.0)?;
    let k_corrupt = k_clean.affine(-1.0, 1.0)?;
    let f = |t: Tensor| t.to_dtype(DType::F32);
    let same = f(q_block.broadcast_eq(&k_block)?)?;
    let earlier = f(k_block.broadcast_lt(&q_block)?)?;
    let not_later = f(k_block.broadcast_le(&q_block)?)?;
    let own_block = q_corrupt.broadcast_mul(&k_corrupt)?.mul(&same)?;
    let clean_context = q_corrupt.broadcast_mul(&k_clean)?.mul(&earlier)?;
    let clean_causal = q_clean.broadcast_mul(&k_clean)?.mul(&not_later)?;
    let allowed = ((own_block + clean_context)? + clean_causal)?;
    let zeros = Tensor::zeros((2 * len, 2 * len), DType::F32, device)?;
    let blocked = Tensor::full(f32::NEG_INFINITY, (2 * len, 2 * len), device)?;
    Ok(allowed.gt(0.5)?.where_cond(&zeros, &blocked)?)
}

#[cfg(test)]
mod tests {
    use super::MaskRule;

    #[test]
    fn block_causal_is_causal_in_the_prompt_and_whole_within_a_block() {
        let rule = MaskRule::BlockCausal {
            prefix: 3,
            block: 2,
        };
        // prompt: causal
        assert!(rule.allows(1, 0) && !rule.allows(1, 2));
        // the prompt does not see the completion
        assert!(!rule.allows(2, 3));
        // block [3, 4] sees itself whole and the prompt; not block [5, 6]
        assert!(rule.allows(3, 4) && rule.allows(4, 3) && rule.allows(3, 0));
        assert!(!rule.allows(4, 5));
        assert!(rule.allows(6, 3) && rule.allows(5, 6));
    }

    #[test]
    fn block_of_one_is_causal() {
        let rule = MaskRule::BlockCausal {
            prefix: 2,
            block: 1,
        };
        for q in 0..8 {
            for k in 0..8 {
                assert_eq!(rule.allows(q, k), MaskRule::Causal.allows(q, k), "{q} {k}");
            }
        }
    }
}
