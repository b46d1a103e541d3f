//! The paged KV cache's bookkeeping under a long random sequence of what a worker does:
//! admit a sequence (reusing a cached prefix), commit blocks, fork a sequence (sharing its
//! pages), finish one, preempt the newest and re-admit it later. After every operation the pool
//! must account for every page exactly: holders equal the block tables' references, nothing on
//! the free list twice, free + used = total.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sdlm_engine::kv::{BlockTable, PageId, PagePool};

const PAGES: usize = 48;
const PAGE_TOKENS: usize = 4;

/// Holders of each page according to the live tables.
fn references(tables: &[BlockTable]) -> HashMap<PageId, u32> {
    let mut refs = HashMap::new();
    for t in tables {
        for &p in t.page_ids() {
            *refs.entry(p).or_insert(0) += 1;
        }
    }
    refs
}

fn check(pool: &PagePool, tables: &[BlockTable], op: usize) {
    pool.check()
        .unwrap_or_else(|e| panic!("after operation {op}: {e}"));
    let refs = references(tables);
    for page in 0..PAGES as PageId {
        let want = refs.get(&page).copied().unwrap_or(0);
        assert_eq!(pool.holders(page), want, "page {page} after operation {op}");
    }
    assert_eq!(pool.free_pages() + pool.used_pages(), pool.total());
    assert_eq!(pool.used_pages(), refs.len(), "after operation {op}");
}

/// A prompt over a small alphabet with a few shared beginnings, so prefixes repeat.
fn prompt(rng: &mut StdRng) -> Vec<u32> {
    let stem = rng.random_range(0..4u32);
    let mut p: Vec<u32> = (0..rng.random_range(0..12))
        .map(|i| stem * 100 + i)
        .collect();
    p.extend((0..rng.random_range(1..10)).map(|_| rng.random_range(0..6u32)));
    p
}

#[test]
fn a_hundred_thousand_random_operations_keep_every_page_accounted_for() {
    let mut rng = StdRng::seed_from_u64(20261127);
    let pool = PagePool::new(PAGES, PAGE_TOKENS);
    let mut tables: Vec<BlockTable> = Vec::new();
    let mut preempted: Vec<Vec<u32>> = Vec::new();
    let (mut reused, mut refused) = (0usize, 0usize);
    for op in 0..100_000 {
        match rng.random_range(0..100) {
            // Admit a new sequence, or re-admit a preempted one (recomputed from its tokens).
            0..=24 => {
                let tokens = match rng.random_bool(0.3) {
                    true => preempted.pop().unwrap_or_else(|| prompt(&mut rng)),
                    false => prompt(&mut rng),
                };
                let mut table = BlockTable::reusing_prefix(&pool, &tokens);
                assert!(
                    table.len() < tokens.len(),
                    "the last prompt token is always run"
                );
                assert_eq!(table.tokens(), &tokens[..table.len()]);
                reused += table.len();
                let rest = tokens[table.len()..].to_vec();
                match table.commit(&pool, &rest) {
                    Ok(()) => {
                        // Its forward wrote the K/V: the full pages may now be shared.
                        let written = table.len();
                        table.publish(&pool, written);
                        tables.push(table)
                    }
                    Err(_) => refused += 1, // dropped: its pages go back
                }
            }
            // Commit a block to a running sequence; when the pool is full, preempt the newest.
            25..=69 if !tables.is_empty() => {
                let i = rng.random_range(0..tables.len());
                let block: Vec<u32> = (0..rng.random_range(1..9))
                    .map(|_| rng.random_range(0..6u32))
                    .collect();
                let before = tables[i].clone();
                let committed = tables[i].commit(&pool, &block);
                if committed.is_ok() {
                    let written = tables[i].len();
                    tables[i].publish(&pool, written);
                }
                if committed.is_err() {
                    assert_eq!(
                        tables[i].tokens(),
                        before.tokens(),
                        "a failed commit changes nothing"
                    );
                    assert_eq!(tables[i].page_ids(), before.page_ids());
                    drop(before);
                    if let Some(newest) = tables.pop() {
                        preempted.push(newest.tokens().to_vec());
                    }
                }
            }
            // Fork: a second sequence sharing every page of the first.
            70..=79 if !tables.is_empty() => {
                let i = rng.random_range(0..tables.len());
                tables.push(tables[i].clone());
            }
            // Finish a sequence.
            80..=94 if !tables.is_empty() => {
                let i = rng.random_range(0..tables.len());
                tables.swap_remove(i);
            }
            // Preempt the newest.
            _ => {
                if let Some(newest) = tables.pop() {
                    preempted.push(newest.tokens().to_vec());
                }
                preempted.truncate(64);
            }
        }
        check(&pool, &tables, op);
    }
    let stats = pool.prefix_stats();
    eprintln!(
        "{} tables live, {reused} prompt tokens reused, {refused} admissions refused, {stats:?}",
        tables.len()
    );
    // The run exercised what it claims to: reuse, eviction and refusal all happened.
    assert!(stats.hits > 1000 && stats.evictions > 1000 && refused > 100);
    tables.clear();
    preempted.clear();
    assert_eq!(pool.free_pages(), PAGES);
    pool.check().unwrap();
}

#[test]
fn a_second_prompt_with_the_same_beginning_holds_the_same_pages() {
    let pool = PagePool::new(16, 4);
    let prompt: Vec<u32> = (0..11).collect(); // two full pages and three tokens
    let mut first = BlockTable::reusing_prefix(&pool, &prompt);
    assert_eq!(first.len(), 0, "nothing cached yet");
    first.commit(&pool, &prompt).unwrap();
    first.publish(&pool, prompt.len());
    let mut longer = prompt.clone();
    longer.extend([50, 51, 52]);
    let second = BlockTable::reusing_prefix(&pool, &longer);
    assert_eq!(second.len(), 8);
    assert_eq!(second.page_ids(), &first.page_ids()[..2]);
    assert_eq!(pool.holders(first.page_ids()[0]), 2);
    // A prompt that differs in its first page shares nothing, even where later tokens match.
    let mut other = prompt.clone();
    other[0] = 99;
    assert_eq!(BlockTable::reusing_prefix(&pool, &other).len(), 0);
    // A prompt of exactly two pages reuses only the first: its last token must run again.
    assert_eq!(BlockTable::reusing_prefix(&pool, &prompt[..8]).len(), 4);
    // After both finish, the pages stay cached (idle) and still serve a third prompt.
    drop((first, second));
    assert_eq!(pool.used_pages(), 0);
    assert_eq!(BlockTable::reusing_prefix(&pool, &longer).len(), 8);
}

#[test]
fn a_page_is_shared_only_once_its_keys_and_values_are_written() {
    let pool = PagePool::new(16, 4);
    let prompt: Vec<u32> = (0..11).collect();
    let mut first = BlockTable::new();
    first.commit(&pool, &prompt).unwrap();
    // Committed but not yet written (its forward is running, or failed): not shared.
    assert_eq!(BlockTable::reusing_prefix(&pool, &prompt).len(), 0);
    first.publish(&pool, 5); // only the first page is written
    assert_eq!(BlockTable::reusing_prefix(&pool, &prompt).len(), 4);
    first.publish(&pool, prompt.len());
    assert_eq!(BlockTable::reusing_prefix(&pool, &prompt).len(), 8);
}
