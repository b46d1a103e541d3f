//! The page pool: a fixed number of KV pages of `page_tokens` tokens each, handed out as
//! [`PageRef`]s. A page is in exactly one of three states:
//!
//! - **used**: one or more `PageRef`s hold it (block tables, prefix lookups in flight);
//! - **cached**: nobody holds it, but it keeps a full committed page that a later prompt with
//!   the same prefix can reuse; evicted least recently released first when pages run out;
//! - **free**: on the free list.
//!
//! `free_pages()` counts free and cached pages (both can be allocated), so free + used = total
//! always. A `PageRef` returns its page when the last holder drops it: no page can leak or be
//! freed twice, because the only way to release a reference is to drop it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

/// A page's index in the pool (and in each layer's K/V storage).
pub type PageId = u32;

/// Counters of the prefix cache, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixStats {
    pub lookups: u64,
    pub hits: u64,
    pub evictions: u64,
}

#[derive(Debug)]
struct State {
    /// Holders of each page.
    refs: Vec<u32>,
    free: Vec<PageId>,
    /// Chain hash → the page holding that prefix, and back with the page's own tokens (a hit
    /// must match them too, so a 64-bit collision of two different pages cannot alias).
    by_hash: HashMap<u64, PageId>,
    hash_of: HashMap<PageId, (u64, Vec<u32>)>,
    /// Cached pages nobody holds, by release time: the first is evicted first.
    idle: BTreeMap<u64, PageId>,
    idle_since: HashMap<PageId, u64>,
    clock: u64,
    stats: PrefixStats,
}

impl State {
    fn hold(&mut self, page: PageId) {
        if self.refs[page as usize] == 0 {
            if let Some(t) = self.idle_since.remove(&page) {
                self.idle.remove(&t);
            }
        }
        self.refs[page as usize] += 1;
    }

    fn release(&mut self, page: PageId) {
        let refs = &mut self.refs[page as usize];
        debug_assert!(*refs > 0, "page {page} released more often than held");
        *refs = refs.saturating_sub(1);
        if *refs > 0 {
            return;
        }
        if self.hash_of.contains_key(&page) {
            self.clock += 1;
            self.idle.insert(self.clock, page);
            self.idle_since.insert(page, self.clock);
        } else {
            self.free.push(page);
        }
    }

    /// A page nobody holds: from the free list, else the least recently released cached one.
    fn take(&mut self) -> Option<PageId> {
        if let Some(page) = self.free.pop() {
            return Some(page);
        }
        let (&t, &page) = self.idle.iter().next()?;
        self.idle.remove(&t);
        self.idle_since.remove(&page);
        if let Some((hash, _)) = self.hash_of.remove(&page) {
            self.by_hash.remove(&hash);
        }
        self.stats.evictions += 1;
        Some(page)
    }
}

/// The pool; cheap to clone (one shared state).
#[derive(Clone, Debug)]
pub struct PagePool {
    state: Arc<Mutex<State>>,
    page_tokens: usize,
    total: usize,
}

/// One holder's reference to a page; the page goes back when the last one is dropped.
#[derive(Debug)]
pub struct PageRef {
    page: PageId,
    pool: PagePool,
}

impl PagePool {
    /// `total` pages of `page_tokens` tokens (both at least 1).
    pub fn new(total: usize, page_tokens: usize) -> Self {
        let total = total.min(PageId::MAX as usize);
        Self {
            state: Arc::new(Mutex::new(State {
                refs: vec![0; total],
                // Reversed so that pages are handed out from 0 upwards (easier to read in logs).
                free: (0..total as PageId).rev().collect(),
                by_hash: HashMap::new(),
                hash_of: HashMap::new(),
                idle: BTreeMap::new(),
                idle_since: HashMap::new(),
                clock: 0,
                stats: PrefixStats::default(),
            })),
            page_tokens: page_tokens.max(1),
            total,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves counts that are still consistent (every
        // mutation is a single step), so a poisoned lock is taken over rather than propagated.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn page_tokens(&self) -> usize {
        self.page_tokens
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Pages that can be allocated now: free, or cached and held by nobody.
    pub fn free_pages(&self) -> usize {
        let s = self.state();
        s.free.len() + s.idle.len()
    }

    /// Pages somebody holds.
    pub fn used_pages(&self) -> usize {
        self.total - self.free_pages()
    }

    /// Pages needed for `tokens` tokens.
    pub fn pages_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.page_tokens)
    }

    /// A page for new contents (evicting the oldest idle cached page if nothing is free).
    pub fn allocate(&self) -> Option<PageRef> {
        let mut s = self.state();
        let page = s.take()?;
        s.refs[page as usize] = 1;
        Some(PageRef {
            page,
            pool: self.clone(),
        })
    }

    /// The cached page holding the prefix with this chain hash and these tokens, if any.
    pub fn lookup(&self, hash: u64, tokens: &[u32]) -> Option<PageRef> {
        let mut s = self.state();
        s.stats.lookups += 1;
        let page = *s.by_hash.get(&hash)?;
        if s.hash_of.get(&page).is_none_or(|(_, own)| own != tokens) {
            return None;
        }
        s.stats.hits += 1;
        s.hold(page);
        Some(PageRef {
            page,
            pool: self.clone(),
        })
    }

    /// Offers a full committed page for reuse under its chain hash. When another page already
    /// holds that prefix, the existing one stays the cached copy.
    pub fn publish(&self, page: &PageRef, hash: u64, tokens: &[u32]) {
        let mut s = self.state();
        if s.by_hash.contains_key(&hash) || s.hash_of.contains_key(&page.page) {
            return;
        }
        s.by_hash.insert(hash, page.page);
        s.hash_of.insert(page.page, (hash, tokens.to_vec()));
    }

    pub fn prefix_stats(&self) -> PrefixStats {
        self.state().stats
    }

    /// Holders of a page (for tests and invariant checks).
    pub fn holders(&self, page: PageId) -> u32 {
        self.state().refs.get(page as usize).copied().unwrap_or(0)
    }

    /// Pages in the cache (held or idle).
    pub fn cached_pages(&self) -> usize {
        self.state().by_hash.len()
    }

    /// Checks the pool's bookkeeping: every page in exactly one state, no page on the free
    /// list twice, the cache maps consistent. For tests; describes the first problem found.
    pub fn check(&self) -> Result<(), String> {
        let s = self.state();
        let mut on_free_list = vec![false; self.total];
        for &p in &s.free {
            let slot = on_free_list
                .get_mut(p as usize)
                .ok_or(format!("page {p} on the free list is out of range"))?;
            if std::mem::replace(slot, true) {
                return Err(format!("page {p} is on the free list twice"));
            }
        }
        for page in 0..self.total as PageId {
            let (refs, free) = (s.refs[page as usize], on_free_list[page as usize]);
            let cached = s.hash_of.contains_key(&page);
            let idle = s.idle_since.contains_key(&page);
            let ok = match (refs > 0, free, cached, idle) {
                (true, false, _, false) => true,     // used (cached or not)
                (false, true, false, false) => true, // free
                (false, false, true, true) => true,  // cached, idle
                _ => false,
            };
            if !ok {
                return Err(format!(
                    "page {page}: {refs} holders, free list {free}, cached {cached}, idle {idle}"
                ));
            }
        }
        if s.idle.len() != s.idle_since.len() || s.by_hash.len() != s.hash_of.len() {
            return Err("the cache's maps disagree in size".into());
        }
        for (&hash, &page) in &s.by_hash {
            if s.hash_of.get(&page).map(|(h, _)| *h) != Some(hash) {
                return Err(format!(
                    "hash {hash:x} points at page {page}, which has another"
                ));
            }
        }
        Ok(())
    }
}

impl PageRef {
    pub fn id(&self) -> PageId {
        self.page
    }
}

impl Clone for PageRef {
    fn clone(&self) -> Self {
        self.pool.state().hold(self.page);
        Self {
            page: self.page,
            pool: self.pool.clone(),
        }
    }
}

impl Drop for PageRef {
    fn drop(&mut self) {
        self.pool.state().release(self.page);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_come_back_when_the_last_holder_drops() {
        let pool = PagePool::new(2, 16);
        let a = pool.allocate().unwrap();
        let b = a.clone();
        assert_eq!((pool.free_pages(), pool.holders(a.id())), (1, 2));
        drop(a);
        assert_eq!(pool.free_pages(), 1);
        drop(b);
        assert_eq!(pool.free_pages(), 2);
    }

    #[test]
    fn the_oldest_idle_cached_page_is_evicted_first() {
        let pool = PagePool::new(2, 16);
        let (a, b) = (pool.allocate().unwrap(), pool.allocate().unwrap());
        pool.publish(&a, 1, &[1]);
        pool.publish(&b, 2, &[2]);
        let (ia, ib) = (a.id(), b.id());
        drop(a);
        drop(b);
        assert_eq!((pool.free_pages(), pool.cached_pages()), (2, 2));
        // Touch page a again: now b is the older idle one.
        assert!(pool.lookup(1, &[9]).is_none(), "same hash, other tokens");
        drop(pool.lookup(1, &[1]).unwrap());
        let c = pool.allocate().unwrap();
        assert_eq!(c.id(), ib);
        assert!(pool.lookup(2, &[2]).is_none());
        assert_eq!(pool.lookup(1, &[1]).unwrap().id(), ia);
        assert_eq!(pool.prefix_stats().evictions, 1);
        // Page a is idle again; the next allocation evicts it, and then nothing is left.
        let d = pool.allocate().unwrap();
        assert_eq!(d.id(), ia);
        assert!(pool.allocate().is_none());
        assert_eq!((pool.free_pages(), pool.used_pages()), (0, 2));
    }
}
