//! The paged forward of a ragged batch against each sequence run alone through the contiguous
//! KV cache (`forward_cached`, itself tested against full recomputation in decode.rs), on the
//! shipped diffusion model (the batch's script: tests/common/paged_script.rs).

mod common;

use std::path::PathBuf;

use common::paged_script::alone_and_paged;
use sdlm_engine::kv::{BlockTable, KvStorage, PagePool};
use sdlm_engine::{open_model, Device, LogitRows, Model, PagedSeq, Tensor};

fn shipped_model() -> Model {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/sdlm-tiny-code");
    open_model(&dir, &Device::Cpu).unwrap().0
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
    d.max(0).unwrap().to_scalar().unwrap()
}

#[test]
fn a_ragged_paged_batch_equals_each_sequence_run_alone() {
    let model = shipped_model();
    let host = |m: &Model, pool: &PagePool| {
        KvStorage::new(
            m.config().num_hidden_layers,
            pool.total(),
            m.attention_shape(4),
        )
    };
    for (s, steps) in alone_and_paged(&model, host).iter().enumerate() {
        for (step, (a, b)) in steps.iter().enumerate() {
            let diff = max_abs_diff(a, b);
            eprintln!("sequence {s}, step {step}: max |Δlogit| = {diff:e}");
            assert!(diff <= 1e-4, "sequence {s}, step {step}: {diff}");
        }
    }
}

#[test]
fn a_prompt_whose_beginning_is_cached_gives_the_logits_of_a_cold_run() {
    let model = shipped_model();
    let prompt: Vec<u32> = (0..23).map(|i| 20 + i * 13 % 500).collect();
    let pool = PagePool::new(32, 4);
    let mut storage = KvStorage::new(
        model.config().num_hidden_layers,
        pool.total(),
        model.attention_shape(4),
    );
    let prefill = |table: &BlockTable, tokens: &[u32], context: usize, storage: &mut KvStorage| {
        let seq = PagedSeq {
            tokens,
            table: table.view(),
            context,
            query_block: 1,
            commit: tokens.len(),
            logits: LogitRows::All,
        };
        model.forward_paged(&[seq], storage).unwrap()
    };
    let mut cold = BlockTable::new();
    cold.commit(&pool, &prompt).unwrap();
    let cold_logits = prefill(&cold, &prompt, 0, &mut storage);
    cold.publish(&pool, prompt.len());
    let mut warm = BlockTable::reusing_prefix(&pool, &prompt);
    let reused = warm.len();
    assert_eq!(
        reused, 20,
        "five full pages of the 23-token prompt are cached"
    );
    assert_eq!(warm.page_ids(), &cold.page_ids()[..5]);
    warm.commit(&pool, &prompt[reused..]).unwrap();
    let warm_logits = prefill(&warm, &prompt[reused..], reused, &mut storage);
    let cold_tail = cold_logits
        .narrow(0, reused, prompt.len() - reused)
        .unwrap();
    let diff = max_abs_diff(&cold_tail, &warm_logits);
    assert!(diff <= 1e-4, "{diff}");
}

/// Each step's logits (as bits) for prompts of these lengths, prefilled and then given one
/// denoising step of a 4-token block that reads the committed pages, run on `workers` rayon
/// workers: a CPU forward splits its batch into one part per worker, one part on one.
fn prefill_then_denoise(model: &Model, prompt_lens: &[usize], workers: usize) -> Vec<Vec<u32>> {
    let mask = model.config().diffusion.mask_token_id.unwrap();
    let blocks = prompt_lens.iter().map(|_| vec![mask; 4]).collect();
    on_workers(workers, || {
        steps_asking(model, prompt_lens, blocks, |_, _| LogitRows::All)
    })
}

fn on_workers<R: Send>(workers: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(workers)
        .build()
        .unwrap()
        .install(f)
}

/// Two paged forwards of prompts of these lengths: their prefill, then a denoising step of
/// each 4-token block of `blocks` that reads the committed pages, each sequence asking for the
/// logits `rows(sequence, prefill)`. Each step's logits as bits, `[rows, vocab]` flattened.
fn steps_asking(
    model: &Model,
    prompt_lens: &[usize],
    blocks: Vec<Vec<u32>>,
    rows: impl Fn(usize, bool) -> LogitRows,
) -> Vec<Vec<u32>> {
    let prompts: Vec<Vec<u32>> = prompt_lens
        .iter()
        .enumerate()
        .map(|(s, &n)| {
            (0..n)
                .map(|i| 10 + ((i * 31 + s * 97) % 3000) as u32)
                .collect()
        })
        .collect();
    let pool = PagePool::new(128, 4);
    let mut storage = KvStorage::new(
        model.config().num_hidden_layers,
        pool.total(),
        model.attention_shape(4),
    );
    let mut tables: Vec<BlockTable> = prompts.iter().map(|_| BlockTable::new()).collect();
    for (table, p) in tables.iter_mut().zip(&prompts) {
        table.commit(&pool, p).unwrap();
    }
    let mut step = |inputs: &[Vec<u32>], prefill: bool| {
        let seqs: Vec<PagedSeq<'_>> = tables
            .iter()
            .zip(inputs)
            .zip(&prompts)
            .enumerate()
            .map(|(s, ((t, tokens), p))| PagedSeq {
                tokens,
                table: t.view(),
                context: if prefill { 0 } else { p.len() },
                query_block: if prefill { 1 } else { 4 },
                commit: if prefill { p.len() } else { 0 },
                logits: rows(s, prefill),
            })
            .collect();
        let logits = model.forward_paged(&seqs, &mut storage).unwrap();
        let values = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        values.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
    };
    vec![step(&prompts, true), step(&blocks, false)]
}

#[test]
fn a_batch_run_in_parts_side_by_side_gives_the_logits_of_one_part_bit_for_bit() {
    // f32 products split a batch from 128 tokens a part on: 300 prompt tokens, then 7 blocks.
    let model = shipped_model();
    let lens = [39, 60, 24, 57, 46, 32, 42];
    let one_part = prefill_then_denoise(&model, &lens, 1);
    assert!(prefill_then_denoise(&model, &lens, 2) == one_part);
}

#[test]
fn with_bf16_products_parts_of_a_long_batch_give_the_logits_of_one_part_bit_for_bit() {
    // The AMX products compute each row alone, whatever the rows beside it.
    let mut model = shipped_model();
    if let Err(e) = model.set_matmul_precision(sdlm_engine::MatmulPrecision::Bf16) {
        eprintln!("skipped: {e}");
        return;
    }
    let lens = [9, 30, 4, 17, 26, 12, 40];
    let one_part = prefill_then_denoise(&model, &lens, 1);
    assert!(prefill_then_denoise(&model, &lens, 2) == one_part);
}

#[test]
fn only_the_wanted_rows_reach_the_last_layer_and_the_lm_head_with_the_logits_of_every_row() {
    let mut model = shipped_model();
    let mask = model.config().diffusion.mask_token_id.unwrap();
    let vocab = model.config().vocab_size;
    // Prefill: none of the first prompt (on two workers, a part of its own: one part's LM
    // head rows are none), the last row of the second, all of the third; block: the first's
    // from its second token, the masked rows of the second, all of the third.
    let picked = |s: usize, prefill: bool| match (s, prefill) {
        (0, true) => LogitRows::None,
        (1, true) => LogitRows::Last,
        (0, false) => LogitRows::From(1),
        (1, false) => LogitRows::Masked {
            first: 0,
            mask_id: mask,
        },
        _ => LogitRows::All,
    };
    // Blocks part decoded, as a denoising step sees them.
    let blocks = vec![
        vec![42, mask, mask, mask],
        vec![mask, 40, mask, 41],
        vec![mask; 4],
    ];
    let lens = [30, 9, 17];
    // Those rows among every row of each step: prompts of 30, 9 and 17 tokens, blocks of 4.
    let wanted: [Vec<usize>; 2] = [
        std::iter::once(38).chain(39..56).collect(),
        [1, 2, 3, 4, 6, 8, 9, 10, 11].to_vec(),
    ];
    for precision in [
        sdlm_engine::MatmulPrecision::F32,
        sdlm_engine::MatmulPrecision::Bf16,
    ] {
        if let Err(e) = model.set_matmul_precision(precision) {
            eprintln!("{precision:?} skipped: {e}");
            continue;
        }
        for workers in [1, 2] {
            let run = |rows: &(dyn Fn(usize, bool) -> LogitRows + Sync)| {
                on_workers(workers, || {
                    steps_asking(&model, &lens, blocks.clone(), rows)
                })
            };
            let every = run(&|_, _| LogitRows::All);
            let some = run(&picked);
            for (step, rows) in wanted.iter().enumerate() {
                let want: Vec<u32> = rows
                    .iter()
                    .flat_map(|&r| every[step][r * vocab..(r + 1) * vocab].iter().copied())
                    .collect();
                assert!(
                    some[step] == want,
                    "{precision:?}, {workers} workers, step {step}"
                );
            }
        }
    }
}
