//! A sequence's block table: the pages that hold its committed tokens, in order. Only committed
//! tokens enter it (the open diffusion block is recomputed each step and written once, at
//! commit). Every page that fills up is published to the pool's prefix cache under its chain
//! hash, so a later prompt that starts with the same tokens reuses it; it is published only once
//! the forward that writes its keys and values has succeeded ([`BlockTable::publish`]), so no
//! other sequence can read a page whose K/V are not there yet, or never will be.

use super::pool::{PageId, PagePool, PageRef};

/// The pool had no page for a commit (nothing free, nothing evictable).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the KV cache is full: {needed} more pages needed, {free} free of {total}")]
pub struct OutOfPages {
    pub needed: usize,
    pub free: usize,
    pub total: usize,
}

/// The hash of a full page given the hash of everything before it: equal hashes mean equal
/// prefixes (up to 64-bit collisions, and the pool also compares the page's own tokens).
pub fn chain_hash(parent: u64, tokens: &[u32]) -> u64 {
    use std::hash::{Hash, Hasher};
    // DefaultHasher::new() has fixed keys: the same value for the same input in one build,
    // which is all an in-memory cache needs.
    let mut h = std::hash::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// The chain hash before the first page.
const ROOT: u64 = 0x5344_4c4d_4b56_0001;

#[derive(Clone, Debug, Default)]
pub struct BlockTable {
    pages: Vec<PageRef>,
    /// The pages' ids, kept beside the references so that a forward can borrow them (or a
    /// step batcher copy them) without touching the pool's lock.
    ids: Vec<PageId>,
    tokens: Vec<u32>,
    /// Chain hash of each full page.
    hashes: Vec<u64>,
}

/// What a forward reads of a block table: its pages in order and how many tokens they hold.
#[derive(Clone, Copy, Debug)]
pub struct TableView<'a> {
    pub pages: &'a [PageId],
    pub len: usize,
}

impl TableView<'_> {
    /// Where token `i` lives: its page and the offset in it.
    pub fn slot(&self, i: usize, page_tokens: usize) -> Option<(PageId, usize)> {
        if i >= self.len {
            return None;
        }
        Some((*self.pages.get(i / page_tokens)?, i % page_tokens))
    }
}

impl BlockTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// A table holding the cached pages of the longest full-page prefix of `prompt`, never the
    /// whole prompt: its last token is always run again, for the logits that follow it. The
    /// tokens it covers are `len()`; the caller computes the rest.
    pub fn reusing_prefix(pool: &PagePool, prompt: &[u32]) -> Self {
        let mut table = Self::new();
        let n = pool.page_tokens();
        let reusable = prompt.len().saturating_sub(1) / n;
        for chunk in prompt.chunks_exact(n).take(reusable) {
            let hash = chain_hash(table.last_hash(), chunk);
            let Some(page) = pool.lookup(hash, chunk) else {
                break;
            };
            table.ids.push(page.id());
            table.pages.push(page);
            table.tokens.extend_from_slice(chunk);
            table.hashes.push(hash);
        }
        table
    }

    fn last_hash(&self) -> u64 {
        self.hashes.last().copied().unwrap_or(ROOT)
    }

    /// Appends committed tokens, taking pages as they are needed. All or nothing: when the pool
    /// cannot supply every page, nothing changes. The caller writes their K/V (a forward), then
    /// calls [`BlockTable::publish`].
    pub fn commit(&mut self, pool: &PagePool, tokens: &[u32]) -> Result<(), OutOfPages> {
        let needed = pool.pages_for(self.tokens.len() + tokens.len()) - self.pages.len();
        let mut fresh = Vec::with_capacity(needed);
        for _ in 0..needed {
            match pool.allocate() {
                Some(p) => fresh.push(p),
                None => {
                    drop(fresh);
                    return Err(OutOfPages {
                        needed,
                        free: pool.free_pages(),
                        total: pool.total(),
                    });
                }
            }
        }
        self.ids.extend(fresh.iter().map(PageRef::id));
        self.pages.extend(fresh);
        self.tokens.extend_from_slice(tokens);
        Ok(())
    }

    /// Publishes to the prefix cache every full page among the first `written` tokens (those
    /// whose K/V are in the pages) that is not published yet.
    pub fn publish(&mut self, pool: &PagePool, written: usize) {
        let n = pool.page_tokens();
        let full = written.min(self.tokens.len()) / n;
        for page in self.hashes.len()..full {
            let chunk = &self.tokens[page * n..(page + 1) * n];
            let hash = chain_hash(self.last_hash(), chunk);
            pool.publish(&self.pages[page], hash, chunk);
            self.hashes.push(hash);
        }
    }

    /// Committed tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn page_ids(&self) -> &[PageId] {
        &self.ids
    }

    pub fn view(&self) -> TableView<'_> {
        TableView {
            pages: &self.ids,
            len: self.tokens.len(),
        }
    }

    /// Where token `i` lives: its page and the offset in it.
    pub fn slot(&self, i: usize, page_tokens: usize) -> Option<(PageId, usize)> {
        self.view().slot(i, page_tokens)
    }
}
