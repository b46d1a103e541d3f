//! One forward for a ragged batch of sequences over the paged KV cache, the step batcher's unit
//! of work: every sequence brings its new tokens (a prefill chunk, an open diffusion block, one
//! AR token) at its own positions; the projections and MLPs run once over all of them, and
//! attention reads each sequence's committed tokens from its pages.
//!
//! On the CPU a batch runs in parts side by side, one per rayon worker ([`parts`]), each part a
//! whole forward over its sequences: the two cores of the machine this was measured on then
//! never wait for each other inside a forward, where splitting each op across them cost a
//! fork and a join per op (about sixty a forward of the shipped model) and a product at a time
//! on one core. A part reads the weights itself (each core streams them once, as one sequence
//! does alone), and a row's numbers do not depend on the rows beside it (the products, norms
//! and attention are row by row), so a sequence decodes the same in any part. The pages are only
//! read while the parts run (a forward's attention reads the cache below each sequence's new
//! tokens, and those tokens' own K/V from the forward), and the committed rows are written once
//! all parts are done.

use std::ops::Range;

use candle_core::{Module, Tensor};
use rayon::prelude::*;
use sdlm_kernels::{AttentionShape, RaggedBatch};

use super::layers::{LayerPages, NewKv, PagedStep};
use super::LogitRows;
use super::Model;
use crate::error::{EngineError, Result};
use crate::kv::{KvStorage, TableView};

/// Tokens a part of a batch has at least when a CPU forward splits it, by matmul precision:
/// below this, a part's products are bound by reading the weights, which every part reads in
/// full. The AMX tiles are compute-bound from a few rows on; the f32 products of up to 64 rows
/// (`f32_rows`) read every weight for each group of rows, and split into parts of about 47
/// rows at 16 sequences they were 9–10% slower than one batch with each product split.
const PART_TOKENS_BF16: usize = 16;
const PART_TOKENS_F32: usize = 128;

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
        let mut parts = self.forward_paged_parts(seqs, storage, |_, logits| Ok(logits))?;
        Ok(match parts.len() {
            1 => parts.remove(0),
            _ => Tensor::cat(&parts, 0)?,
        })
    }

    /// [`Model::forward_paged`] handing each part of the batch's logits (`[rows, vocab]` of the
    /// sequences `seqs[range]`) to `finish` on the thread that ran the part, and returning what
    /// it makes, in order. The step batcher makes its greedy choices there, side by side like
    /// the parts, and never copies the parts' logits into one tensor (at 16 sequences of the
    /// shipped model, 1.1–1.6 MB and 0.15 ms a round on the 2-core Xeon).
    pub fn forward_paged_parts<R: Send>(
        &self,
        seqs: &[PagedSeq<'_>],
        storage: &mut KvStorage,
        finish: impl Fn(Range<usize>, Tensor) -> Result<R> + Sync,
    ) -> Result<Vec<R>> {
        super::on_workers::on_workers(self.device(), || self.run_paged(seqs, storage, &finish))
    }

    fn run_paged<R: Send>(
        &self,
        seqs: &[PagedSeq<'_>],
        storage: &mut KvStorage,
        finish: &(impl Fn(Range<usize>, Tensor) -> Result<R> + Sync),
    ) -> Result<Vec<R>> {
        let shape = *storage.shape();
        if shape != self.attention_shape(shape.page_size) {
            return Err(EngineError::Input(format!(
                "the KV storage is shaped {shape:?}, not for this model"
            )));
        }
        check(seqs)?;
        if let Some(pages) = storage.on_device() {
            let layout = Layout::of(seqs);
            let slots = commit_slots(seqs, &layout.commits, layout.ids.len(), shape.page_size)?;
            let batch = layout.ragged();
            let device_batch =
                pages.upload_batch(&shape, &batch, &slots, &layout.rope_positions())?;
            let (logits, _) = self.run_layers(
                &layout,
                shape,
                Some(&device_batch),
                LayerPages::Device(pages),
            )?;
            return Ok(vec![finish(0..seqs.len(), logits)?]);
        }
        let workers = match crate::switches::WHOLE_BATCH.on() {
            true => 1,
            false => rayon::current_num_threads(),
        };
        let min_tokens = match self.matmul_precision {
            super::MatmulPrecision::Bf16 => PART_TOKENS_BF16,
            super::MatmulPrecision::F32 => PART_TOKENS_F32,
        };
        let parts = parts(seqs, workers, min_tokens);
        let host: &KvStorage = storage;
        let runs = parts
            .par_iter()
            .map(|range| {
                let layout = Layout::of(&seqs[range.clone()]);
                let (logits, kv) = self.run_layers(&layout, shape, None, LayerPages::Host(host))?;
                Ok((finish(range.clone(), logits)?, kv, layout.commits))
            })
            .collect::<Result<Vec<_>>>()?;
        for (range, (_, kv, commits)) in parts.iter().zip(&runs) {
            write_commits(storage, &seqs[range.clone()], commits, kv)?;
        }
        Ok(runs.into_iter().map(|(made, _, _)| made).collect())
    }

    /// The layers and the LM head over one batch: logits `[rows, vocab]` and, from host pages,
    /// each layer's new K/V.
    fn run_layers(
        &self,
        layout: &Layout,
        shape: AttentionShape,
        device: Option<&crate::kv::DeviceBatch>,
        mut pages: LayerPages<'_>,
    ) -> Result<(Tensor, Vec<NewKv>)> {
        let rope_positions = layout.rope_positions();
        let step = PagedStep {
            batch: layout.ragged(),
            shape,
            device,
            positions: &rope_positions,
            rotary: &self.rotary,
            cos_sin: Default::default(),
        };
        self.rotary.check(&layout.positions)?;
        let input = Tensor::new(layout.ids.as_slice(), self.device())?.unsqueeze(0)?;
        let mut x = self.embed_tokens.forward(&input)?;
        let mut new_kv = Vec::new();
        // The last layer takes the wanted rows on through attention and the MLP, and only
        // those (host pages; the device kernel attends and commits every row as it goes).
        let last = self.layers.len().saturating_sub(1);
        let (on_host, all) = (
            matches!(pages, LayerPages::Host(_)),
            layout.wanted.len() == layout.ids.len(),
        );
        let picked = on_host && !all && !crate::switches::EVERY_ROW_TO_THE_END.on();
        for (index, layer) in self.layers.iter().enumerate() {
            let rows = (picked && index == last).then_some(layout.wanted.as_slice());
            let (out, kv) = layer.forward_paged(&x, &step, &mut pages, index, rows)?;
            x = out;
            new_kv.extend(kv);
        }
        let rows: Vec<usize> = match picked {
            true => (0..layout.wanted.len()).collect(),
            false => layout.wanted.clone(),
        };
        Ok((self.logits_of(&x, &rows)?.squeeze(0)?, new_kv))
    }
}

/// An error naming the first sequence whose step does not fit its table.
fn check(seqs: &[PagedSeq<'_>]) -> Result<()> {
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
    }
    Ok(())
}

/// The batch's sequences in consecutive parts of about equal [`cost`], at most `workers` of
/// them, as many as give each part about `min_tokens` tokens (one part when the batch is
/// smaller).
fn parts(seqs: &[PagedSeq<'_>], workers: usize, min_tokens: usize) -> Vec<Range<usize>> {
    let tokens: usize = seqs.iter().map(|s| s.tokens.len()).sum();
    let count = workers.min(seqs.len()).min(tokens / min_tokens).max(1);
    let costs: Vec<usize> = seqs.iter().map(cost).collect();
    let total: usize = costs.iter().sum();
    let mut parts = Vec::with_capacity(count);
    let (mut start, mut seen) = (0, 0);
    for (i, c) in costs.iter().enumerate() {
        seen += c;
        let left = seqs.len() - i - 1;
        let parts_left = count - parts.len() - 1;
        // Cut where this part's share ends, to the nearer side of the next sequence's middle,
        // keeping a sequence for each part still to come.
        let half_next = costs.get(i + 1).map_or(0, |n| n / 2);
        let reached = (seen + half_next) * count >= total * (parts.len() + 1);
        if parts_left > 0 && left >= parts_left && reached {
            parts.push(start..i + 1);
            start = i + 1;
        }
    }
    parts.push(start..seqs.len());
    parts
}

/// A sequence's share of a CPU forward's work, in units of about 0.12 µs (the shipped model in
/// bf16 on the 2-core Xeon, from the round's phases at 16 sequences): a new token about 100 (its
/// rows through the products, norms and MLP) plus one per token it attends to, a row of logits
/// about 47 (its LM-head row and greedy choice). The attention's share varies most from one
/// sequence to another (contexts of 25 to 90 tokens in a benchmark), and parts balanced by
/// tokens alone left the faster core waiting 10% of a round for the slower.
fn cost(s: &PagedSeq<'_>) -> usize {
    let tokens = s.tokens.len();
    tokens * (100 + s.context + tokens / 2) + 47 * s.logits.rows(s.tokens).len()
}

/// A batch's inputs as the forward and the kernels take them.
struct Layout {
    starts: Vec<i32>,
    contexts: Vec<i32>,
    blocks: Vec<i32>,
    tables: Vec<i32>,
    max_pages: usize,
    ids: Vec<u32>,
    positions: Vec<u32>,
    /// Per sequence: its first token in the batch, its context and how many new tokens it
    /// commits.
    commits: Vec<(usize, usize, usize)>,
    /// The batch rows whose logits are returned.
    wanted: Vec<usize>,
}

impl Layout {
    fn of(seqs: &[PagedSeq<'_>]) -> Self {
        let max_pages = seqs
            .iter()
            .map(|s| s.table.pages.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut l = Layout {
            starts: vec![0],
            contexts: Vec::with_capacity(seqs.len()),
            blocks: Vec::with_capacity(seqs.len()),
            tables: vec![0; seqs.len() * max_pages],
            max_pages,
            ids: Vec::new(),
            positions: Vec::new(),
            commits: Vec::with_capacity(seqs.len()),
            wanted: Vec::new(),
        };
        for (i, s) in seqs.iter().enumerate() {
            for (j, &p) in s.table.pages.iter().enumerate() {
                l.tables[i * max_pages + j] = p as i32;
            }
            let first = l.ids.len();
            l.commits.push((first, s.context, s.commit));
            l.wanted
                .extend(s.logits.rows(s.tokens).iter().map(|&r| first + r));
            l.ids.extend_from_slice(s.tokens);
            l.positions
                .extend((s.context..s.context + s.tokens.len()).map(|p| p as u32));
            l.starts.push(l.ids.len() as i32);
            l.contexts.push(s.context as i32);
            l.blocks.push(s.query_block as i32);
        }
        l
    }

    /// Each new token's position as the RoPE kernels take it. One too large for an i32 becomes
    /// -1, outside every table; `Rotary::check` refuses such a position (by its own value)
    /// before any layer runs.
    fn rope_positions(&self) -> Vec<i32> {
        self.positions
            .iter()
            .map(|&p| i32::try_from(p).unwrap_or(-1))
            .collect()
    }

    fn ragged(&self) -> RaggedBatch<'_> {
        RaggedBatch {
            query_starts: &self.starts,
            context_lens: &self.contexts,
            query_blocks: &self.blocks,
            block_tables: &self.tables,
            max_pages_per_seq: self.max_pages,
        }
    }
}

/// Writes each sequence's committed rows of every layer's new K/V into the host pages.
fn write_commits(
    storage: &mut KvStorage,
    seqs: &[PagedSeq<'_>],
    commits: &[(usize, usize, usize)],
    new_kv: &[NewKv],
) -> Result<()> {
    let Some((k, _)) = new_kv.first() else {
        return Ok(());
    };
    let row = storage.shape().num_kv_heads * storage.shape().head_dim;
    let tokens = k.len() / row.max(1);
    let slots = commit_slots(seqs, commits, tokens, storage.shape().page_size)?;
    Ok(storage.write_slots(&slots, new_kv)?)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_consecutive_cover_every_sequence_and_balance_their_cost() {
        let tables: Vec<u32> = Vec::new();
        let seq = |tokens: &'static [u32]| PagedSeq {
            tokens,
            table: TableView {
                pages: &tables,
                len: 0,
            },
            context: 0,
            query_block: 1,
            commit: 0,
            logits: LogitRows::All,
        };
        const FOUR: &[u32] = &[1; 4];
        const FORTY: &[u32] = &[1; 40];
        // 16 blocks of 4 tokens on 2 workers: 8 and 8.
        let blocks = vec![seq(FOUR); 16];
        assert_eq!(parts(&blocks, 2, 16), [0..8, 8..16]);
        // One worker, one sequence, or too few tokens: one part.
        let one = |r: Range<usize>| vec![r];
        assert_eq!(parts(&blocks, 1, 16), one(0..16));
        assert_eq!(parts(&blocks[..1], 2, 16), one(0..1));
        assert_eq!(parts(&blocks[..3], 2, 16), one(0..3));
        // A long prompt chunk first: it is a part of its own.
        let mut mixed = vec![seq(FORTY)];
        mixed.extend(vec![seq(FOUR); 10]);
        assert_eq!(parts(&mixed, 2, 16), [0..1, 1..11]);
        // Two blocks over long contexts and two over none: the attention makes the first
        // the larger share, a part of its own.
        let mut long = vec![seq(FOUR); 4];
        long[0].context = 1000;
        long[1].context = 1000;
        assert_eq!(parts(&long, 2, 4), [0..1, 1..4]);
        // More workers than a batch fills: each part keeps at least its minimum of tokens.
        let parts16 = parts(&blocks, 16, 16);
        assert_eq!(parts16.len(), 4);
        let mut next = 0;
        for p in &parts16 {
            assert_eq!(p.start, next);
            assert!(!p.is_empty());
            next = p.end;
        }
        assert_eq!(next, 16);
    }
}
