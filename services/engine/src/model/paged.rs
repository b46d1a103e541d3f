//! One forward for a ragged batch of sequences over the paged KV cache, the step batcher's unit
//! of work: every sequence brings its new tokens (a prefill chunk, an open diffusion block, one
//! AR token) at its own positions; the projections and MLPs run once over all of them, and
//! attention reads each sequence's committed tokens from its pages.

use candle_core::{DType, Module, Tensor};
use sdlm_kernels::{AttentionShape, RaggedBatch};

use super::layers::{self, Ops, PagedStep};
use super::Model;
use crate::error::{EngineError, Result};
use crate::kv::{BlockTable, KvStorage};

/// One sequence's part of a paged forward.
#[derive(Clone, Copy, Debug)]
pub struct PagedSeq<'a> {
    /// The tokens this step runs, at positions `context..`.
    pub tokens: &'a [u32],
    /// The sequence's pages. Its first `context` tokens are in the cache; when `commit` > 0,
    /// the table already holds the new tokens to commit (pages allocated by the caller).
    pub table: &'a BlockTable,
    pub context: usize,
    /// The mask rule among the new tokens: i sees j iff j / query_block <= i / query_block.
    pub query_block: usize,
    /// How many of the new tokens (from the first) to write into the cache.
    pub commit: usize,
}

impl Model {
    /// The attention geometry of this model over pages of `page_tokens` tokens.
    pub fn attention_shape(&self, page_tokens: usize) -> AttentionShape {
        AttentionShape {
            num_heads: self.config.num_attention_heads,
            num_kv_heads: self.config.num_key_value_heads,
            head_dim: self.config.head_dim,
            page_size: page_tokens,
        }
    }

    /// Logits `[tokens, vocab]` for every new token of every sequence, in order; the first
    /// `commit` new tokens of each sequence have their keys and values written to `storage`.
    pub fn forward_paged(&self, seqs: &[PagedSeq<'_>], storage: &mut KvStorage) -> Result<Tensor> {
        let shape = *storage.shape();
        if shape != self.attention_shape(shape.page_size) {
            return Err(EngineError::Input(format!(
                "the KV storage is shaped {shape:?}, not for this model"
            )));
        }
        let pages: Vec<Vec<_>> = seqs.iter().map(|s| s.table.page_ids()).collect();
        let max_pages = pages.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let (mut starts, mut contexts, mut blocks) = (vec![0i32], Vec::new(), Vec::new());
        let mut tables = vec![0i32; seqs.len() * max_pages];
        let (mut ids, mut positions, mut commits) = (Vec::new(), Vec::new(), Vec::new());
        for (i, s) in seqs.iter().enumerate() {
            let n = s.tokens.len();
            if n == 0 || s.commit > n || s.context + s.commit > s.table.len() || s.query_block == 0
            {
                return Err(EngineError::Input(format!(
                    "sequence {i}: {n} tokens, commit {}, context {}, query_block {}, table of {} \
                     tokens (needs tokens >= 1, commit <= tokens, context + commit <= table, \
                     query_block >= 1)",
                    s.commit,
                    s.context,
                    s.query_block,
                    s.table.len()
                )));
            }
            for (j, &p) in pages[i].iter().enumerate() {
                tables[i * max_pages + j] = p as i32;
            }
            commits.push((ids.len(), s.context, s.commit));
            ids.extend_from_slice(s.tokens);
            positions.extend((s.context..s.context + n).map(|p| p as u32));
            starts.push(ids.len() as i32);
            contexts.push(s.context as i32);
            blocks.push(s.query_block as i32);
        }
        let refs: Vec<&BlockTable> = seqs.iter().map(|s| s.table).collect();
        let step = PagedStep {
            batch: RaggedBatch {
                query_starts: &starts,
                context_lens: &contexts,
                query_blocks: &blocks,
                block_tables: &tables,
                max_pages_per_seq: max_pages,
            },
            shape,
            commits: &commits,
            tables: &refs,
        };
        let (cos, sin) = self.rotary.at(&positions)?;
        let input = Tensor::new(ids.as_slice(), self.device())?.unsqueeze(0)?;
        let mut x = self.embed_tokens.forward(&input)?;
        for (layer, block) in self.layers.iter().enumerate() {
            x = block.forward_paged(&x, &cos, &sin, &step, storage, layer)?;
        }
        let x = layers::rms_norm(&self.norm, &x, Ops::Fast)?;
        Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?.squeeze(0)?)
    }
}
