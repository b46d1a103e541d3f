//! A scripted ragged batch for the paged forward (CPU and GPU tests): prefill of prompts of
//! different lengths, diffusion blocks of different sizes and a one-token AR row in one batch, a
//! commit of a finished block together with the next block's masks, and blocks that read those
//! committed pages afterwards; each step also run by each sequence alone through the contiguous
//! KV cache (`forward_cached`).

use sdlm_engine::kv::{BlockTable, KvStorage, PagePool};
use sdlm_engine::{KvCache, LogitRows, Model, PagedSeq, Tensor};

/// Rows of each sequence in a batch's logits.
fn split(logits: &Tensor, lens: &[usize]) -> Vec<Tensor> {
    let mut at = 0;
    lens.iter()
        .map(|&n| {
            let t = logits.narrow(0, at, n).unwrap();
            at += n;
            t
        })
        .collect()
}

/// One sequence's script: a prompt, then blocks of `block` tokens.
struct Script {
    prompt: Vec<u32>,
    block: usize,
}

/// One paged forward's sequences: each script's tokens from `inputs`, with the (context,
/// query block, commit) that `plan` gives for it.
fn batch<'a>(
    scripts: &[Script],
    tables: &'a [BlockTable],
    inputs: &'a [Vec<u32>],
    plan: impl Fn(&Script) -> (usize, usize, usize),
) -> Vec<PagedSeq<'a>> {
    scripts
        .iter()
        .zip(tables)
        .zip(inputs)
        .map(|((sc, table), tokens)| {
            let (context, query_block, commit) = plan(sc);
            PagedSeq {
                tokens,
                table: table.view(),
                context,
                query_block,
                commit,
                logits: LogitRows::All,
            }
        })
        .collect()
}

/// Each sequence's logits per step: (alone, in the paged batch). `storage_for` makes the pages
/// the batch runs over, for a pool of pages of 4 tokens.
pub fn alone_and_paged(
    model: &Model,
    storage_for: impl Fn(&Model, &PagePool) -> KvStorage,
) -> Vec<Vec<(Tensor, Tensor)>> {
    let mask = model.config().diffusion.mask_token_id.unwrap();
    let vocab = model.config().vocab_size as u32;
    let token = |i: usize| (i as u32 * 7919 + 11) % (vocab - 10) + 10;
    let scripts: Vec<Script> = [(5, 4), (17, 8), (33, 1), (2, 32)]
        .iter()
        .enumerate()
        .map(|(s, &(len, block))| Script {
            prompt: (0..len).map(|i| token(i + 100 * s)).collect(),
            block,
        })
        .collect();
    // Each block: its committed tokens and the masks the decoder would run.
    let finished = |s: usize, b: usize, n: usize| -> Vec<u32> {
        (0..n).map(|i| token(1000 + 100 * s + 10 * b + i)).collect()
    };
    let masks = |n: usize| vec![mask; n];

    // Alone: the contiguous cache, one sequence at a time.
    let mut want: Vec<Vec<Tensor>> = Vec::new();
    for (s, sc) in scripts.iter().enumerate() {
        let mut cache = KvCache::new();
        let b = sc.block;
        let mut steps = Vec::new();
        steps.push(
            model
                .forward_cached(&sc.prompt, &mut cache, 1, true)
                .unwrap(),
        );
        steps.push(
            model
                .forward_cached(&masks(b), &mut cache, b, false)
                .unwrap(),
        );
        let mut commit_then_next = finished(s, 0, b);
        commit_then_next.extend(masks(b));
        steps.push(
            model
                .forward_cached_committing(&commit_then_next, &mut cache, b, b)
                .unwrap(),
        );
        steps.push(
            model
                .forward_cached(&masks(b), &mut cache, b, false)
                .unwrap(),
        );
        want.push(steps);
    }

    // Together: one paged forward per step for all four sequences, pages of 4 tokens.
    let pool = PagePool::new(64, 4);
    let mut storage = storage_for(model, &pool);
    let _held = pool.allocate(); // the tables' pages do not start at 0
    let mut tables: Vec<BlockTable> = scripts.iter().map(|_| BlockTable::new()).collect();
    for (table, sc) in tables.iter_mut().zip(&scripts) {
        table.commit(&pool, &sc.prompt).unwrap();
    }
    let mut got: Vec<Vec<Tensor>> = scripts.iter().map(|_| Vec::new()).collect();
    let run = |seqs: &[PagedSeq<'_>], storage: &mut KvStorage, got: &mut Vec<Vec<Tensor>>| {
        let lens: Vec<usize> = seqs.iter().map(|s| s.tokens.len()).collect();
        let logits = model.forward_paged(seqs, storage).unwrap();
        for (g, part) in got.iter_mut().zip(split(&logits, &lens)) {
            g.push(part);
        }
    };
    // Prefill: each prompt causal, committed.
    let prompts: Vec<Vec<u32>> = scripts.iter().map(|sc| sc.prompt.clone()).collect();
    let seqs = batch(&scripts, &tables, &prompts, |sc| (0, 1, sc.prompt.len()));
    run(&seqs, &mut storage, &mut got);
    // A denoising step of each open block: nothing written.
    let blocks: Vec<Vec<u32>> = scripts.iter().map(|sc| masks(sc.block)).collect();
    let seqs = batch(&scripts, &tables, &blocks, |sc| {
        (sc.prompt.len(), sc.block, 0)
    });
    run(&seqs, &mut storage, &mut got);
    // The finished block committed by the next block's first forward.
    let mut inputs = Vec::new();
    for (s, (table, sc)) in tables.iter_mut().zip(&scripts).enumerate() {
        let done = finished(s, 0, sc.block);
        table.commit(&pool, &done).unwrap();
        let mut input = done;
        input.extend(masks(sc.block));
        inputs.push(input);
    }
    let seqs = batch(&scripts, &tables, &inputs, |sc| {
        (sc.prompt.len(), sc.block, sc.block)
    });
    run(&seqs, &mut storage, &mut got);
    // The next block reads the committed block from the pages.
    let seqs = batch(&scripts, &tables, &blocks, |sc| {
        (sc.prompt.len() + sc.block, sc.block, 0)
    });
    run(&seqs, &mut storage, &mut got);

    want.into_iter()
        .zip(got)
        .map(|(w, g)| w.into_iter().zip(g).collect())
        .collect()
}
