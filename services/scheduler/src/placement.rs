//! Admission in KV pages and placement on the least-loaded worker. A placement reserves the
//! sequence's pages (prompt + max_new_tokens) on its worker in the scheduler's own books and
//! returns them when dropped; the worker checks again on its side.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::pool::{WorkerPool, WorkerSlot};

/// What placement looks at of one worker.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub alive: bool,
    pub serves_model: bool,
    pub draining: bool,
    /// None until the first capacity report.
    pub pages_total: Option<usize>,
    pub page_tokens: usize,
    pub reserved_pages: usize,
    pub assigned: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoPlace {
    /// No live worker serves the model.
    NoWorker,
    /// Every suitable worker is full for now.
    Full,
    /// Larger than any suitable worker's whole cache: waiting cannot help.
    TooLarge { pages: usize, largest: usize },
}

impl NoPlace {
    /// The refusal of a sequence no worker could ever hold.
    pub fn too_large(pages: usize, largest: usize) -> tonic::Status {
        tonic::Status::resource_exhausted(format!(
            "the sequence needs {pages} KV pages (prompt + max_new_tokens); the largest worker has {largest}"
        ))
    }
}

/// The index of the worker to place a sequence of `tokens` on: among live, non-draining
/// workers of the model with enough unreserved pages, the one with the fewest sequences (then
/// the fewest reserved pages).
pub fn choose(candidates: &[Candidate], tokens: usize) -> Result<usize, NoPlace> {
    let suitable: Vec<(usize, &Candidate, usize, usize)> = candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.alive && c.serves_model && !c.draining)
        .filter_map(|(i, c)| {
            let total = c.pages_total?;
            Some((i, c, total, tokens.div_ceil(c.page_tokens.max(1))))
        })
        .collect();
    if suitable.is_empty() {
        return Err(NoPlace::NoWorker);
    }
    if suitable.iter().all(|(_, _, total, need)| need > total) {
        let (_, _, largest, pages) = suitable
            .iter()
            .max_by_key(|(_, _, total, _)| *total)
            .copied()
            .ok_or(NoPlace::NoWorker)?;
        return Err(NoPlace::TooLarge { pages, largest });
    }
    suitable
        .into_iter()
        .filter(|(_, c, total, need)| c.reserved_pages + need <= *total)
        .min_by_key(|(i, c, _, _)| (c.assigned, c.reserved_pages, *i))
        .map(|(i, ..)| i)
        .ok_or(NoPlace::Full)
}

/// A sequence's seat on a worker; gives its pages back when dropped.
pub struct Placement {
    pub slot: Arc<WorkerSlot>,
    pages: usize,
    pool: Arc<WorkerPool>,
}

impl Drop for Placement {
    fn drop(&mut self) {
        self.slot
            .reserved_pages
            .fetch_sub(self.pages, Ordering::SeqCst);
        self.slot.assigned.fetch_sub(1, Ordering::SeqCst);
        self.pool.changed.notify_waiters();
    }
}

/// Places a sequence of `tokens` tokens of `model` (empty: any model).
pub fn place(pool: &Arc<WorkerPool>, model: &str, tokens: usize) -> Result<Placement, NoPlace> {
    let slots = pool.slots();
    let candidates: Vec<Candidate> = slots
        .iter()
        .map(|s| {
            let capacity = s.capacity.lock().ok().and_then(|c| *c);
            Candidate {
                alive: s.is_alive(),
                serves_model: model.is_empty() || s.model().as_deref() == Some(model),
                draining: capacity.as_ref().is_some_and(|c| c.draining),
                pages_total: capacity.as_ref().map(|c| c.kv_pages_total as usize),
                page_tokens: capacity.as_ref().map_or(16, |c| c.page_tokens as usize),
                reserved_pages: s.reserved_pages.load(Ordering::SeqCst),
                assigned: s.assigned.load(Ordering::SeqCst),
            }
        })
        .collect();
    let i = choose(&candidates, tokens)?;
    let slot = Arc::clone(&slots[i]);
    let pages = tokens.div_ceil(candidates[i].page_tokens.max(1));
    slot.reserved_pages.fetch_add(pages, Ordering::SeqCst);
    slot.assigned.fetch_add(1, Ordering::SeqCst);
    Ok(Placement {
        slot,
        pages,
        pool: Arc::clone(pool),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(total: usize, reserved: usize, assigned: usize) -> Candidate {
        Candidate {
            alive: true,
            serves_model: true,
            draining: false,
            pages_total: Some(total),
            page_tokens: 16,
            reserved_pages: reserved,
            assigned,
        }
    }

    #[test]
    fn the_least_loaded_worker_with_room_is_chosen() {
        let ws = [worker(100, 10, 3), worker(100, 50, 1), worker(100, 0, 2)];
        assert_eq!(choose(&ws, 160), Ok(1));
        // 60 pages: worker 1 has only 50 left, so the next least loaded takes it.
        assert_eq!(choose(&ws, 960), Ok(2));
    }

    #[test]
    fn dead_draining_and_other_models_are_never_chosen() {
        let mut dead = worker(100, 0, 0);
        dead.alive = false;
        let mut draining = worker(100, 0, 0);
        draining.draining = true;
        let mut other = worker(100, 0, 0);
        other.serves_model = false;
        let unknown = Candidate {
            pages_total: None,
            ..worker(100, 0, 0)
        };
        assert_eq!(
            choose(&[dead, draining, other, unknown.clone()], 16),
            Err(NoPlace::NoWorker)
        );
        assert_eq!(choose(&[unknown, worker(10, 0, 5)], 16), Ok(1));
    }

    #[test]
    fn full_workers_make_a_sequence_wait_and_oversized_ones_fail() {
        let ws = [worker(10, 9, 1), worker(10, 10, 1)];
        assert_eq!(choose(&ws, 32), Err(NoPlace::Full));
        assert_eq!(
            choose(&ws, 16 * 11),
            Err(NoPlace::TooLarge {
                pages: 11,
                largest: 10
            })
        );
    }
}
