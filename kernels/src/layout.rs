//! How a batch of sequences lies in memory for attention: the query tokens of all sequences one
//! after another (ragged), and each sequence's committed tokens in cache pages named by its row of
//! the block table.

use crate::error::{check_len, KernelError};

/// Head geometry and page size. Tensors are row-major:
/// q, out `[tokens, num_heads, head_dim]`; k_new, v_new `[tokens, num_kv_heads, head_dim]`;
/// k_pages, v_pages `[num_pages, page_size, num_kv_heads, head_dim]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub page_size: usize,
}

impl AttentionShape {
    /// Elements of one cache page (one layer, K or V).
    pub fn page_elems(&self) -> usize {
        self.page_size * self.num_kv_heads * self.head_dim
    }

    /// Query heads that share one kv head (grouped-query attention).
    pub fn group(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    pub fn validate(&self) -> Result<(), KernelError> {
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(KernelError::OutOfRange {
                field: "num_kv_heads",
                value: self.num_kv_heads as i64,
                limit: format!("must be positive and divide num_heads = {}", self.num_heads),
            });
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(8) {
            return Err(KernelError::OutOfRange {
                field: "head_dim",
                value: self.head_dim as i64,
                limit: "must be a positive multiple of 8".into(),
            });
        }
        if self.page_size == 0 {
            return Err(KernelError::OutOfRange {
                field: "page_size",
                value: 0,
                limit: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}

/// A ragged batch of query blocks over the paged cache.
#[derive(Clone, Copy, Debug)]
pub struct RaggedBatch<'a> {
    /// Offsets of each sequence's query tokens: sequence s owns tokens
    /// `query_starts[s]..query_starts[s + 1]`. Length sequences + 1, starting at 0.
    pub query_starts: &'a [i32],
    /// Committed tokens of each sequence already in the cache; all of them are visible.
    pub context_lens: &'a [i32],
    /// The mask rule among each sequence's new tokens: token i sees token j iff
    /// `j / query_block <= i / query_block` (1: causal, >= query length: bidirectional).
    pub query_blocks: &'a [i32],
    /// `[sequences, max_pages_per_seq]`: the pages holding each sequence's committed tokens, in
    /// order. Entries past the pages a sequence uses are not read.
    pub block_tables: &'a [i32],
    pub max_pages_per_seq: usize,
}

/// Sizes derived from a validated batch, used to size launches and buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchStats {
    pub num_seqs: usize,
    pub num_tokens: usize,
    pub max_query_len: usize,
    /// The largest context + query length: keys one query row may scan.
    pub max_keys: usize,
}

impl RaggedBatch<'_> {
    /// Checks every index the kernels will follow, so that no kernel reads out of bounds.
    pub fn validate(
        &self,
        shape: &AttentionShape,
        num_pages: usize,
    ) -> Result<BatchStats, KernelError> {
        shape.validate()?;
        let num_seqs = self.context_lens.len();
        check_len("query_starts", self.query_starts.len(), num_seqs + 1)?;
        check_len("query_blocks", self.query_blocks.len(), num_seqs)?;
        check_len(
            "block_tables",
            self.block_tables.len(),
            num_seqs * self.max_pages_per_seq,
        )?;
        if self.query_starts[0] != 0 {
            return Err(out_of_range(
                "query_starts[0]",
                self.query_starts[0],
                "must be 0",
            ));
        }
        let (mut max_query_len, mut max_keys) = (0usize, 0usize);
        for s in 0..num_seqs {
            let len = self.query_starts[s + 1] - self.query_starts[s];
            if len < 1 {
                return Err(out_of_range(
                    "query length",
                    len,
                    "each sequence needs at least 1 query token",
                ));
            }
            if self.query_blocks[s] < 1 {
                return Err(out_of_range(
                    "query_blocks",
                    self.query_blocks[s],
                    "must be at least 1",
                ));
            }
            let ctx = self.context_lens[s];
            if ctx < 0 {
                return Err(out_of_range("context_lens", ctx, "must not be negative"));
            }
            let pages_needed = (ctx as usize).div_ceil(shape.page_size);
            if pages_needed > self.max_pages_per_seq {
                return Err(out_of_range(
                    "context_lens",
                    ctx,
                    &format!(
                        "needs {pages_needed} pages; block table rows hold {}",
                        self.max_pages_per_seq
                    ),
                ));
            }
            for &page in &self.block_tables[s * self.max_pages_per_seq..][..pages_needed] {
                if page < 0 || page as usize >= num_pages {
                    return Err(out_of_range(
                        "block_tables",
                        page,
                        &format!("the pool has {num_pages} pages"),
                    ));
                }
            }
            max_query_len = max_query_len.max(len as usize);
            max_keys = max_keys.max(ctx as usize + len as usize);
        }
        Ok(BatchStats {
            num_seqs,
            num_tokens: self.query_starts[num_seqs] as usize,
            max_query_len,
            max_keys,
        })
    }
}

fn out_of_range(field: &'static str, value: i32, limit: &str) -> KernelError {
    KernelError::OutOfRange {
        field,
        value: value as i64,
        limit: limit.to_string(),
    }
}
