//! KV capacity in pages of `page_tokens` tokens: what the worker admits against and reports to
//! the scheduler. A sequence reserves pages for its prompt plus `max_new_tokens` when it starts
//! and returns them when it ends (the reservation is a value that frees itself on drop). The
//! engine's page pool has the same number of pages, so a sequence admitted here always finds
//! its pages there (prefix sharing only makes it use fewer).

use std::sync::{Arc, Mutex};

use sdlm_engine::Model;

pub const DEFAULT_PAGE_TOKENS: usize = 16;

#[derive(Debug)]
pub struct PageBudget {
    total: usize,
    page_tokens: usize,
    free: Mutex<usize>,
}

/// Pages held by one sequence; returned to the budget on drop.
#[derive(Debug)]
pub struct Pages {
    count: usize,
    budget: Arc<PageBudget>,
}

impl Pages {
    pub fn count(&self) -> usize {
        self.count
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        if let Ok(mut free) = self.budget.free.lock() {
            *free += self.count;
        }
        sdlm_runtime::metrics().kv_pages_used.sub(self.count as i64);
    }
}

/// The default KV budget: half of the GPU's free memory (read after the weights are loaded)
/// for a GPU worker, whose pages live there; half of the memory the kernel reports available
/// for a CPU worker.
pub fn default_kv_cache_bytes(device: &sdlm_engine::Device) -> usize {
    if let Ok(Some(free)) = sdlm_engine::free_device_memory(device) {
        return free / 2;
    }
    let available_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse::<usize>().ok())
        })
        .unwrap_or(4 << 20);
    available_kb * 1024 / 2
}

impl PageBudget {
    pub fn new(kv_cache_bytes: usize, page_tokens: usize, model: &Model) -> Arc<Self> {
        let page_tokens = page_tokens.max(1);
        let total = kv_cache_bytes
            / (page_tokens * sdlm_engine::kv::KvStorage::bytes_per_token(model)).max(1);
        sdlm_runtime::metrics().kv_pages_total.set(total as i64);
        Arc::new(Self {
            total,
            page_tokens,
            free: Mutex::new(total),
        })
    }

    pub fn pages_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.page_tokens)
    }

    pub fn total(&self) -> usize {
        self.total
    }

    pub fn page_tokens(&self) -> usize {
        self.page_tokens
    }

    pub fn free(&self) -> usize {
        self.free.lock().map(|f| *f).unwrap_or(0)
    }

    /// Reserves pages for `tokens` tokens, or None when too few are free.
    pub fn reserve(self: &Arc<Self>, tokens: usize) -> Option<Pages> {
        let count = self.pages_for(tokens);
        let mut free = self.free.lock().ok()?;
        if *free < count {
            return None;
        }
        *free -= count;
        sdlm_runtime::metrics().kv_pages_used.add(count as i64);
        Some(Pages {
            count,
            budget: Arc::clone(self),
        })
    }
}
