//! One forward for a ragged batch of sequences over the paged KV cache, the step batcher's unit
//! of work: every sequence brings its new tokens (a prefill chunk, an open diffusion block, one
//! AR token) at its own positions; the projections and MLPs run once over all of them, and
//! attention reads each sequence's committed tokens from its pages.

use candle_core::{Module, Tensor};
use sdlm_kernels::{AttentionShape, RaggedBatch};

use super::layers::PagedStep;
use super::LogitRows;
use super::Model;
use crate::error::{EngineError, Result};
use crate::kv::{KvStorage, TableView};

/// One sequence's part of a paged forward.
#[derive(Clone, Copy, Debug)]
pub struct PagedSeq<'a> {
    /// The tokens this step runs, at positions `context..`.
    pub tokens: &'a [u32],
    /// The sequence's pages. Its first `context` tokens are in the cache; when `commit` > 0,
    /// the table already holds the new tokens to commit (pages allocated by the caller).
    pub table: TableView<'a>,
    pub context: usize,
    /// The mask rule among the new tokens: i sees j iff j / query_block <= i / query_block.
    pub query_block: usize,
    /// How many of the new tokens (from the first) to write into the cache.
    pub commit: usize,
    /// Which of the new tokens' logits to return.
    pub logits: LogitRows,
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

    /// Logits `[rows, vocab]` for the new tokens each sequence asks for (its [`LogitRows`]), in
    /// order; the first `commit` new tokens of each sequence have their keys and values written
    /// to `storage`.
    pub fn forward_paged(&self, seqs: &[PagedSeq<'_>], storage: &mut KvStorage) -> Result<Tensor> {
        super::on_workers::on_workers(self.device(), || self.run_paged(seqs, storage))
    }

    fn run_paged(&self, seqs: &[PagedSeq<'_>], storage: &mut KvStorage) -> Result<Tensor> {
        let shape = *storage.shape();
        if shape != self.attention_shape(shape.page_size) {
            return Err(EngineError::Input(format!(
                "the KV storage is shaped {shape:?}, not for this model"
            )));
        }
        let max_pages = seqs
            .iter()
            .map(|s| s.table.pages.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let (mut starts, mut contexts, mut blocks) = (vec![0i32], Vec::new(), Vec::new());
        let mut tables = vec![0i32; seqs.len() * max_pages];
        let (mut ids, mut positions, mut commits) = (Vec::new(), Vec::new(), Vec::new());
        let mut wanted: Vec<usize> = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            let n = s.tokens.len();
            if n == 0 || s.commit > n || s.context + s.commit > s.table.len || s.query_block == 0 {
                return Err(EngineError::Input(format!(
                    "sequence {i}: {n} tokens, commit {}, context {}, query_block {}, table of {} \
                     tokens (needs tokens >= 1, commit <= tokens, context + commit <= table, \
                     query_block >= 1)",
                    s.commit, s.context, s.query_block, s.table.len
                )));
            }
            for (j, &p) in s.table.pages.iter().enumerate() {
                tables[i * max_pages + j] = p as i32;
            }
            commits.push((ids.len(), s.context, s.commit));
            wanted.extend(s.logits.rows(s.tokens).iter().map(|&r| ids.len() + r));
            ids.extend_from_slice(s.tokens);
            positions.extend((s.context..s.context + n).map(|p| p as u32));
            starts.push(ids.len() as i32);
            contexts.push(s.context as i32);
            blocks.push(s.query_block as i32);
        }
        let views: Vec<TableView<'_>> = seqs.iter().map(|s| s.table).collect();
        let batch = RaggedBatch {
            query_starts: &starts,
            context_lens: &contexts,
            query_blocks: &blocks,
            block_tables: &tables,
            max_pages_per_seq: max_pages,
        };
        let device_batch = match storage.on_device() {
            Some(pages) => {
                let slots = commit_slots(seqs, &commits, ids.len(), shape.page_size)?;
                Some(pages.upload_batch(&shape, &batch, &slots)?)
            }
            None => None,
        };
        let rope_positions: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
        let step = PagedStep {
            batch,
            shape,
            commits: &commits,
            tables: &views,
            device: device_batch.as_ref(),
            positions: &rope_positions,
            rope: self.rotary.table(),
        };
        let (cos, sin) = self.rotary.at(&positions)?;
        let input = Tensor::new(ids.as_slice(), self.device())?.unsqueeze(0)?;
        let mut x = self.embed_tokens.forward(&input)?;
        for (layer, block) in self.layers.iter().enumerate() {
            x = block.forward_paged(&x, &cos, &sin, &step, storage, layer)?;
        }
        Ok(self.logits_of(&x, &wanted)?.squeeze(0)?)
    }
}

/// Per new token of the batch, the slot its K/V row is written to, or -1 when this forward does
/// not commit it (the scatter kernel's input).
fn commit_slots(
    seqs: &[PagedSeq<'_>],
    commits: &[(usize, usize, usize)],
    tokens: usize,
    page_tokens: usize,
) -> Result<Vec<i32>> {
    let mut slots = vec![-1; tokens];
    for (s, &(first, context, commit)) in seqs.iter().zip(commits) {
        let rows = crate::kv::slots(s.table, context, commit, page_tokens)?;
        slots[first..first + commit].copy_from_slice(&rows);
    }
    Ok(slots)
}
